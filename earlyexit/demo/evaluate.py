"""The demo's measurements: strategies at batch 1 and the engine under each batching policy.

Everything here measures in this process, now; nothing is copied from BENCHMARKS.md. Every
timing is repeated in interleaved rounds and reported as a median with its spread, so the
report can tell a measured difference from timing noise.

- :func:`strategy_rows`: each strategy decodes the same validation prompts one at a time.
  Quality is agreement with the same model's full-depth greedy output (ROUGE-L and token
  match on token ids); speedup is full-depth time / strategy time within each round.
- :func:`engine_rows`: a request stream served by the engine
  (:func:`earlyexit.bench.common.serve_offline`, the ``depthwise`` benchmark's harness)
  under each model x policy; throughput as a ratio to the first model's static batching.

Every ratio is the median of the per-round ratios with its spread
(:func:`earlyexit.demo.stats.ratio_summary`), stored in the row once; the report's tables,
figures and findings all read it from there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from earlyexit.bench.common import serve_offline
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import ExitWarning, make_strategy
from earlyexit.demo.stats import ratio_summary
from earlyexit.evaluation.metrics import agreement, timed_decode


@dataclass
class Config:
    """One strategy configuration: ``curve`` groups points on the Pareto plot."""

    label: str
    curve: str
    name: str
    options: dict


def dense_configs(model, draft_tokens=None) -> list[Config]:
    """Every strategy the dense model with exits serves; with ``draft_tokens`` (the most
    frequent tokens of the corpus) also self-speculation drafting over only those."""
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
    if draft_tokens is not None:
        n = len(draft_tokens)
        out += [
            Config(
                f"speculative k={k} vocab {n}",
                "speculative (pruned draft head)",
                "speculative",
                {"exit_step": first, "draft_k": k, "draft_vocab": draft_tokens},
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
    rounds: int = 3,
    reference_time: float | None = None,
    on_config=None,
) -> tuple[list[dict], dict]:
    """Rows for ``configs`` on ``lm`` plus its full-depth row; and the depths per label.

    Timing is repeated in ``rounds`` interleaved rounds: full depth, then every config, and
    full depth once more at the end; config ``c`` in round ``r`` is compared with the mean of
    the full-depth runs that bracket the round (so a drifting machine biases no config).
    Each row carries the median speedup and its spread (``speedup_lo``, ``speedup_hi``)
    over the rounds: a finding is only drawn from a speedup whose spread supports it.

    ``reference_time``: for a model without a full-depth counterpart (MoR), the seconds the
    dense model's full depth took on the same prompts (its speedup is against that)."""
    warnings.simplefilter("ignore", ExitWarning)
    model = lm.model
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    warm = SamplingParams(max_new_tokens=4, ignore_eos=True)
    timed_decode(model, prompts[:1], warm, make_strategy(model, "full"))
    for c in configs:  # first calls allocate; keep them out of the timed rounds
        timed_decode(model, prompts[:1], warm, make_strategy(model, c.name, **c.options))
    rounds = max(1, rounds)
    t_full, ref = [], None
    times: list[list[float]] = [[] for _ in configs]
    results: list[list | None] = [None] * len(configs)
    tick = on_config or (lambda: None)  # one call per timed decode: (configs + 1) x rounds + 1
    for _ in range(rounds):
        dt, out = timed_decode(model, prompts, params, make_strategy(model, "full"))
        t_full.append(dt)
        tick()
        ref = ref or out
        for i, c in enumerate(configs):
            dt, res = timed_decode(
                model, prompts, params, make_strategy(model, c.name, **c.options)
            )
            times[i].append(dt)
            results[i] = results[i] or res
            tick()
    dt, _ = timed_decode(model, prompts, params, make_strategy(model, "full"))
    t_full.append(dt)
    tick()
    # the full-depth reference of round r: the mean of the runs before and after it
    base_r = [(t_full[r] + t_full[r + 1]) / 2 for r in range(rounds)]
    if reference_time is not None:
        base_r = [reference_time] * rounds
    references = [x.token_ids for x in ref]
    depths = {"full": [d for x in ref for d in x.depths]}
    n_tok = sum(len(x) for x in references)
    is_mor = model.routers is not None
    full_times = [(t_full[r] + t_full[r + 1]) / 2 for r in range(rounds)]
    rows = [
        _row(
            tag,
            "router depth" if is_mor else "full",
            "full",
            {},
            full_times,
            base_r,
            ref,
            references,
            model,
            val_nll,
            n_tok,
            is_mor,
        )
    ]
    for c, ts, res in zip(configs, times, results):
        rows.append(
            _row(
                tag,
                c.label,
                c.curve,
                c.options,
                ts,
                base_r,
                res,
                references,
                model,
                val_nll,
                n_tok,
                False,
            )
        )
        depths[c.label] = [d for x in res for d in x.depths]
    return rows, depths


def _row(
    tag, label, curve, options, times, bases, res, references, model, val_nll, n_tok, vs_dense
):
    depths = [d for r in res for d in r.depths]
    q = agreement([r.token_ids for r in res], references)
    sp = ratio_summary(bases, times)  # full-depth time / this time, per round
    dt = float(np.median(times))
    return {
        "model": tag,
        "label": label,
        "curve": curve,
        "options": {k: (len(v) if k == "draft_vocab" else v) for k, v in options.items()},
        "seconds": dt,
        "tokens_per_s": n_tok / dt,
        "speedup": sp["median"],
        "speedup_lo": sp["lo"],
        "speedup_hi": sp["hi"],
        "rounds": sp["rounds"],
        "speedup_vs": "dense full depth" if vs_dense else "full depth",
        "rouge_l": None if vs_dense else q["rouge_l"],
        "token_match": None if vs_dense else q["token_match"],
        "mean_depth": float(np.mean(depths)),
        "n_steps": model.n_steps,
        "exit_rate": float(np.mean([d < model.n_steps for d in depths])),
        "val_nll": val_nll,
    }


# ---------------------------------------------------------------------- serving
def engine_jobs(lms: dict) -> list[tuple]:
    """(label, model key, policy, exit mode) of every engine run the demo's models allow."""
    from earlyexit.engine import ExitMode

    jobs = []
    for key, title in (("dense", "dense"), ("user", "your model")):
        if key in lms:
            jobs += [(title, key, p, None) for p in ("static", "continuous", "depthwise")]
            steps = lms[key].config.exits.steps
            if steps and lms[key].config.exits.trained:
                mode = ExitMode(steps[0], 0.3)
                jobs += [
                    (f"{title} + FREE exit", key, p, mode) for p in ("continuous", "depthwise")
                ]
    if "recursive" in lms:
        steps = lms["recursive"].config.exits.steps
        mode = ExitMode(steps[0], 0.3) if steps else None
        jobs += [
            ("relaxed recursive + loop exit", "recursive", p, mode)
            for p in ("continuous", "depthwise")
        ]
    if "mor" in lms:
        jobs += [("MoR", "mor", p, None) for p in ("continuous", "depthwise")]
    return jobs


def engine_rows(lms: dict, stream, max_batch: int, rounds: int = 3, on_job=None) -> list[dict]:
    """Serve ``stream`` with every engine job, in ``rounds`` interleaved rounds. The ratio to
    the first job (static batching of the first model) is taken within each round, and each
    row carries its median and spread (``x_static``, ``x_static_lo``, ``x_static_hi``)."""
    jobs = engine_jobs(lms)
    runs: list[list[dict]] = [[] for _ in jobs]
    for _ in range(max(1, rounds)):
        for i, (_, key, policy, mode) in enumerate(jobs):
            runs[i].append(serve_offline(lms[key].model, stream, policy, max_batch, mode))
            if on_job:  # one call per run: jobs x rounds
                on_job()
    return [engine_row(job, res, runs[0]) for job, res in zip(jobs, runs)]


def engine_row(job: tuple, res: list[dict], base: list[dict]) -> dict:
    """One engine job's row from its runs (one per round) and the baseline's runs in the
    same rounds: tokens/s is the median run's, ``x_static`` the median of the per-round
    ratios to the baseline (:func:`~earlyexit.demo.stats.ratio_summary`), the value every
    table, figure and finding of the report shows."""
    label, key, policy, mode = job
    x = ratio_summary([r["tokens_per_s"] for r in res], [b["tokens_per_s"] for b in base])
    first = res[0]
    return {
        "model_label": label,
        "model": key,
        "policy": policy,
        "exit": None if mode is None else {"step": mode.step, "threshold": mode.threshold},
        "seconds": float(np.median([r["seconds"] for r in res])),
        "tokens": first["tokens"],
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in res])),
        "mean_depth": first["mean_depth"],
        "depths": first["depths"],
        "occupancy": first["occupancy"]["mean_rows_per_block_call"],
        "x_static": x["median"],
        "x_static_lo": x["lo"],
        "x_static_hi": x["hi"],
        "rounds": x["rounds"],
    }
