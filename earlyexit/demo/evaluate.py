"""The demo's strategy measurements at batch 1 (the engine runs use
:func:`earlyexit.bench.common.serve_offline`, the harness the ``depthwise`` benchmark uses).

Everything here measures in this process, now; nothing is copied from BENCHMARKS.md.

- :func:`strategy_rows`: each strategy decodes the same validation prompts one at a time.
  Quality is agreement with the same model's full-depth greedy output (ROUGE-L and token
  match on token ids); speedup is full-depth time / strategy time, the full-depth time being
  the mean of a run before and a run after the sweep (so a drifting machine biases neither).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from earlyexit.bench.common import agreement, timed_decode
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import ExitWarning, make_strategy


@dataclass
class Config:
    """One strategy configuration: ``curve`` groups points on the Pareto plot."""

    label: str
    curve: str
    name: str
    options: dict


def dense_configs(model) -> list[Config]:
    """Every strategy the dense model with exits serves."""
    steps = model.config.exits.steps
    if not steps:
        return [
            Config(
                "speculative k=4",
                "speculative",
                "speculative",
                {"exit_step": model.n_steps // 2, "draft_k": 4},
            )
        ]
    first = steps[0]
    out = [Config(f"static@{s}", "static", "static", {"exit_step": s}) for s in steps]
    out += [Config(f"calm λ={t}", "calm", "calm", {"threshold": t}) for t in (0.5, 0.2, 0.1)]
    out += [
        Config(f"free λ={t}", "free", "free", {"exit_step": first, "threshold": t})
        for t in (0.5, 0.2, 0.1, 0.05)
    ]
    out += [
        Config(
            "free adaptive",
            "free (adaptive)",
            "free",
            {"exit_step": first, "threshold": 0.9, "adaptive": True},
        )
    ]
    out += [
        Config(
            f"speculative k={k}", "speculative", "speculative", {"exit_step": first, "draft_k": k}
        )
        for k in (2, 4)
    ]
    return out


def recursive_configs(model) -> list[Config]:
    """Loop exits of the recursive model (its exit is after the first loop)."""
    steps = model.config.exits.steps
    if not steps:
        return []
    s = steps[0]
    out = [Config(f"loop exit static@{s}", "loop exit (static)", "static", {"exit_step": s})]
    out += [
        Config(
            f"loop exit free λ={t}", "loop exit (free)", "free", {"exit_step": s, "threshold": t}
        )
        for t in (0.4, 0.2, 0.1, 0.05)
    ]
    return out


def strategy_rows(
    tag: str,
    lm,
    prompts: list[list[int]],
    new_tokens: int,
    configs: list[Config],
    val_nll: float,
    reference_time: float | None = None,
    on_config=None,
) -> tuple[list[dict], dict]:
    """Rows for ``configs`` on ``lm`` plus its full-depth row; and the depths per label.

    ``reference_time``: for a model without a full-depth counterpart (MoR), the seconds the
    dense model's full depth took on the same prompts (its speedup is against that)."""
    warnings.simplefilter("ignore", ExitWarning)
    model = lm.model
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    full = make_strategy(model, "full")
    timed_decode(
        model, prompts[:1], SamplingParams(max_new_tokens=4, ignore_eos=True), full
    )  # warm-up
    t_before, ref = timed_decode(model, prompts, params, make_strategy(model, "full"))
    references = [r.token_ids for r in ref]
    depths = {"full": [d for r in ref for d in r.depths]}
    measured = []
    for c in configs:
        dt, res = timed_decode(model, prompts, params, make_strategy(model, c.name, **c.options))
        measured.append((c, dt, res))
        if on_config:
            on_config()
    t_after, _ = timed_decode(model, prompts, params, make_strategy(model, "full"))
    t_full = (t_before + t_after) / 2
    base = reference_time if reference_time is not None else t_full
    n_tok = sum(len(r) for r in references)
    is_mor = model.routers is not None
    rows = [
        _row(
            tag,
            "router depth" if is_mor else "full",
            "full",
            {},
            t_full,
            base,
            ref,
            references,
            model,
            val_nll,
            n_tok,
            is_mor,
        )
    ]
    for c, dt, res in measured:
        rows.append(
            _row(
                tag,
                c.label,
                c.curve,
                c.options,
                dt,
                base,
                res,
                references,
                model,
                val_nll,
                n_tok,
                False,
            )
        )
        depths[c.label] = [d for r in res for d in r.depths]
    return rows, depths


def _row(tag, label, curve, options, dt, base, res, references, model, val_nll, n_tok, vs_dense):
    depths = [d for r in res for d in r.depths]
    q = agreement([r.token_ids for r in res], references)
    return {
        "model": tag,
        "label": label,
        "curve": curve,
        "options": options,
        "seconds": dt,
        "tokens_per_s": n_tok / dt,
        "speedup": base / dt,
        "speedup_vs": "dense full depth" if vs_dense else "full depth",
        "rouge_l": None if vs_dense else q["rouge_l"],
        "token_match": None if vs_dense else q["token_match"],
        "mean_depth": float(np.mean(depths)),
        "n_steps": model.n_steps,
        "exit_rate": float(np.mean([d < model.n_steps for d in depths])),
        "val_nll": val_nll,
    }
