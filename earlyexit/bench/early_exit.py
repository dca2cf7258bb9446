"""Benchmarks ``early-exit`` and ``batched-exit``: what early exit buys, alone and in batches.

    earlyexit bench early-exit --model runs/stdlib-small-free/final [--calm-model runs/stdlib-small-calm/final]
    earlyexit bench batched-exit --model runs/stdlib-small-free/final

``early-exit`` (batch 1): every strategy configuration decodes the same validation prompts
one at a time, interleaved with a full-depth run of the same prompts (median of
``repeats`` pairs). Speedup is full time / strategy time in the same run; quality is
agreement with the full model's greedy output (token match rate and ROUGE-L on tokens),
next to the average depth and exit rate.

``batched-exit``: throughput at batch 1, 8, 16, 32 of full depth, the naive batched exit
(CALM's batching: the batch exits only when its least confident row does, with state
propagation) and ours (FREE: each row exits on its own, deep catch-up passes batched
across rows), each against full depth at the same batch size.
"""

from __future__ import annotations

import functools
import statistics
import warnings

from earlyexit.bench.common import environment, load_model, set_threads, write_rows
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import ExitWarning, make_strategy
from earlyexit.evaluation.metrics import agreement, timed_decode, validation_prompts

FREE_SWEEP = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
CALM_SWEEP = (0.9, 0.7, 0.5, 0.3, 0.2, 0.1)
DRAFT_SWEEP = (2, 3, 4, 6)
CLS_SWEEP = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def _decode_all(model, prompts, params, factory, batch_size: int = 1):
    """Decode ``prompts`` in batches with one strategy object; (seconds, results, strategy)."""
    strategy = factory()
    dt, results = timed_decode(model, prompts, params, strategy, batch_size)
    return dt, results, strategy


def _configs(
    model,
    with_calm_on_shared_exit: bool = True,
    draft_vocabs: dict | None = None,
    grid: dict | None = None,
    exit_vocabs: dict | None = None,
):
    """(label, strategy name, options) for the sweep on one model. ``draft_vocabs``: {N:
    the N most frequent token ids}: vocabulary-pruned self-speculation variants (FR-Spec);
    ``exit_vocabs``: the same for FREE's exit head (a pruned exit decision, at each
    threshold of the sweep). ``grid`` overrides the swept values: keys ``free``, ``calm``, ``draft`` (a larger model
    cannot afford the full grid on a CPU)."""
    grid = grid or {}
    free_sweep = grid.get("free", FREE_SWEEP)
    calm_sweep = grid.get("calm", CALM_SWEEP)
    draft_sweep = grid.get("draft", DRAFT_SWEEP)
    cfg = model.config
    out = [(f"static@{s}", "static", {"exit_step": s}) for s in cfg.exits.steps]
    first = cfg.exits.steps[0]
    out += [(f"free λ={t}", "free", {"exit_step": first, "threshold": t}) for t in free_sweep]
    for n, ids in (exit_vocabs or {}).items():
        out += [
            (
                f"free λ={t} vocab {n}",
                "free",
                {"exit_step": first, "threshold": t, "exit_vocab": ids},
            )
            for t in free_sweep
        ]
    out += [("free adaptive", "free", {"exit_step": first, "threshold": 0.9, "adaptive": True})]
    if model.exit_classifiers is not None:  # learned confidence: P(shallow agrees with deep)
        out += [
            (
                f"free cls λ={t}",
                "free",
                {"exit_step": first, "threshold": t, "measure": "classifier"},
            )
            for t in CLS_SWEEP
        ]
    if with_calm_on_shared_exit:
        out += [(f"calm λ={t}", "calm", {"threshold": t}) for t in calm_sweep]
    out += [
        (f"speculative k={k}", "speculative", {"exit_step": first, "draft_k": k})
        for k in draft_sweep
    ]
    for n, ids in (draft_vocabs or {}).items():
        out += [
            (
                f"speculative k={k} vocab {n}",
                "speculative",
                {"exit_step": first, "draft_k": k, "draft_vocab": ids},
            )
            for k in (2, 4)
        ]
    return out


def sweep(
    model_dir: str,
    data: str,
    n_prompts: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    tag: str,
    env: dict,
    draft_vocabs: tuple[int, ...] = (),
    grid: dict | None = None,
    exit_vocabs: tuple[int, ...] = (),
) -> list[dict]:
    lm = load_model(model_dir)
    model = lm.model
    vocabs = _frequent(data, model, {*draft_vocabs, *exit_vocabs})
    prompts = validation_prompts(data, n_prompts, prompt_len)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    full = functools.partial(make_strategy, model, "full")
    _decode_all(model, prompts[:2], params, full)  # warm up
    _, ref, _ = _decode_all(model, prompts, params, full)
    references = [r.token_ids for r in ref]
    rows = []
    configs = _configs(
        model,
        draft_vocabs={n: vocabs[n] for n in draft_vocabs},
        grid=grid,
        exit_vocabs={n: vocabs[n] for n in exit_vocabs},
    )
    for label, name, opts in configs:
        factory = functools.partial(make_strategy, model, name, **opts)
        t_full, t_cfg = [], []
        for r in range(repeats):
            pair = [("full", full), ("cfg", factory)]
            for which, f in pair if r % 2 == 0 else pair[::-1]:
                dt, res, strat = _decode_all(model, prompts, params, f)
                (t_full if which == "full" else t_cfg).append(dt)
                if which == "cfg":
                    outs, stats = [x.token_ids for x in res], strat.stats()
                    depths = [d for x in res for d in x.depths]
        n_tok = sum(len(o) for o in outs)
        row = {
            "bench": "early-exit",
            "model": tag,
            "model_dir": model_dir,
            "label": label,
            "strategy": name,
            "options": _json_options(opts),
            "batch_size": 1,
            "prompts": n_prompts,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "seconds_full": t_full,
            "seconds": t_cfg,
            "tokens_per_s": n_tok / statistics.median(t_cfg),
            "tokens_per_s_full": n_tok / statistics.median(t_full),
            "speedup": statistics.median(t_full) / statistics.median(t_cfg),
            "mean_depth": sum(depths) / len(depths),
            "n_steps": model.n_steps,
            "exit_rate": sum(d < model.n_steps for d in depths) / len(depths),
            **agreement(outs, references),
            "stats": stats,
            "env": env,
        }
        rows.append(row)
        print(
            f"  {tag:5s} {label:20s} speedup {row['speedup']:.2f}x  ROUGE-L {row['rouge_l']:.3f}  "
            f"match {row['token_match']:.3f}  depth {row['mean_depth']:.2f}  exit {row['exit_rate']:.0%}",
            flush=True,
        )
    return rows


def _frequent(data: str, model, sizes) -> dict:
    """{N: the N most frequent token ids of ``data``'s training split} for each N."""
    if not sizes:
        return {}
    from earlyexit.decoding.speculative import frequent_tokens
    from earlyexit.training.data import token_file

    tokens = token_file(data, "train")
    return {n: frequent_tokens(tokens, n, model.config.vocab_size) for n in sizes}


def _json_options(opts: dict) -> dict:
    """Strategy options for a JSON row: a token subset is written as its size."""
    return {k: (len(v) if k in ("draft_vocab", "exit_vocab") else v) for k, v in opts.items()}


def main_early_exit(
    model: str,
    data: str,
    calm_model: str | None = None,
    n_prompts: int = 16,
    prompt_len: int = 32,
    new_tokens: int = 64,
    repeats: int = 2,
    threads: int | None = None,
    out: str | None = "results/early_exit.json",
    draft_vocabs: tuple[int, ...] = (),
    grid: dict | None = None,
    exit_vocabs: tuple[int, ...] = (),
) -> list[dict]:
    threads = set_threads(threads)
    env = environment(threads)
    warnings.simplefilter("ignore", ExitWarning)
    rows = sweep(
        model,
        data,
        n_prompts,
        prompt_len,
        new_tokens,
        repeats,
        "free",
        env,
        draft_vocabs,
        grid,
        exit_vocabs,
    )
    if calm_model:
        rows += sweep(calm_model, data, n_prompts, prompt_len, new_tokens, repeats, "calm", env)
    write_rows(rows, out)
    return rows


def main_batched_exit(
    model: str,
    data: str,
    batch_sizes=(1, 8, 16, 32),
    threshold: float = 0.3,
    n_prompts: int = 32,
    prompt_len: int = 32,
    new_tokens: int = 64,
    repeats: int = 2,
    threads: int | None = None,
    out: str | None = "results/batched_exit.json",
    exit_vocab: int | None = None,
) -> list[dict]:
    """Full depth, naive (CALM sync), ours (FREE as served: rows exit together, batch
    fallback), ours without the fallback, and FREE's per-row exits with and without it
    (``ours-per-row``, ``ours-per-row-nofb``) at each batch size; with ``exit_vocab`` N
    also ours with a pruned exit head over the N most frequent tokens of ``data``
    (``ours-vN``, ``ours-nofb-vN``)."""
    threads = set_threads(threads)
    env = environment(threads)
    warnings.simplefilter("ignore", ExitWarning)
    lm = load_model(model)
    m = lm.model
    ls = m.config.exits.steps[0]
    prompts = validation_prompts(data, n_prompts, prompt_len)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    variants = {
        "full": functools.partial(make_strategy, m, "full"),
        "naive": functools.partial(
            make_strategy, m, "calm", threshold=threshold, min_exit=ls, sync_batch=True
        ),
    }
    # ours: rows exit together + fallback; the ablations: each alone, and neither (what
    # per-row exits cost in lock-step batches)
    for name, opts in (
        ("ours", {}),
        ("ours-nofb", {"min_sync_rate": None}),
        ("ours-per-row", {"sync_batch": False}),
        ("ours-per-row-nofb", {"sync_batch": False, "min_sync_rate": None}),
    ):
        variants[name] = functools.partial(
            make_strategy, m, "free", exit_step=ls, threshold=threshold, **opts
        )
    if exit_vocab is not None:
        ids = _frequent(data, m, {exit_vocab})[exit_vocab]
        for name, fb in (
            (f"ours-v{exit_vocab}", {}),
            (f"ours-nofb-v{exit_vocab}", {"min_sync_rate": None}),
        ):
            variants[name] = functools.partial(
                make_strategy, m, "free", exit_step=ls, threshold=threshold, exit_vocab=ids, **fb
            )
    _decode_all(m, prompts[:2], params, variants["full"])  # warm up
    _, ref, _ = _decode_all(m, prompts, params, variants["full"], 8)
    references = [r.token_ids for r in ref]
    rows = []
    for bs in batch_sizes:
        times = {k: [] for k in variants}
        outs = {}
        for r in range(repeats):
            order = list(variants.items())
            for name, f in order if r % 2 == 0 else order[::-1]:
                dt, res, strat = _decode_all(m, prompts, params, f, bs)
                times[name].append(dt)
                outs[name] = (res, strat.stats())
        n_tok = sum(len(x.token_ids) for x in outs["full"][0])
        for name in variants:
            res, stats = outs[name]
            depths = [d for x in res for d in x.depths]
            row = {
                "bench": "batched-exit",
                "variant": name,
                "batch_size": bs,
                "threshold": threshold,
                "exit_step": ls,
                "prompts": n_prompts,
                "new_tokens": new_tokens,
                "seconds": times[name],
                "tokens_per_s": n_tok / statistics.median(times[name]),
                "speedup_vs_full": statistics.median(times["full"])
                / statistics.median(times[name]),
                "mean_depth": sum(depths) / len(depths),
                "exit_rate": sum(d < m.n_steps for d in depths) / len(depths),
                **agreement([x.token_ids for x in res], references),
                "stats": stats,
                "env": env,
            }
            rows.append(row)
            print(
                f"  batch {bs:2d} {name:14s} {row['tokens_per_s']:8.1f} tok/s  {row['speedup_vs_full']:.2f}x  "
                f"ROUGE-L {row['rouge_l']:.3f}  depth {row['mean_depth']:.2f}",
                flush=True,
            )
    write_rows(rows, out)
    return rows
