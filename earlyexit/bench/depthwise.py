"""Benchmark ``depthwise``: does continuous depth-wise batching deliver throughput?

    earlyexit bench depthwise --dense runs/stdlib-small/final --recursive runs/stdlib-small-rec-exit/final \\
        [--exit-model runs/stdlib-small-free/final] [--threshold 0.3]

A seeded request stream (default 256 requests; prompts of 8-64 validation tokens;
generation lengths ~ Normal(128, 32) clipped to [16, 256]) arrives all at once and is
served by the engine at ``max_batch`` 32 under each configuration, one after the other in
one process. Throughput = generated tokens / wall time. Each model's validation NLL sits
beside it. Configurations:

- vanilla dense, static batching (the baseline of the recursive paper's 2.66x);
- vanilla dense, continuous (sequence-wise) batching;
- recursive (B loops) with a loop exit, continuous depth-wise batching (the paper's CDB);
- the same recursive model with continuous batching, and without exits: ablations;
- naive dense early exit in a static batch (CALM's batching: the batch exits together);
- Mixture-of-Recursions (router-decided depth) with continuous and depth-wise batching.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np

from earlyexit.bench.common import (
    bench_device,
    bench_dtype,
    environment,
    load_model,
    serve_offline,
    set_threads,
    write_rows,
)
from earlyexit.bench.common import request_stream as common_stream
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import ExitWarning, make_strategy
from earlyexit.engine import ExitMode
from earlyexit.evaluation.perplexity import perplexity
from earlyexit.training.data import token_file


def request_stream(data: str, n: int = 256, mean_len: float = 128.0, seed: int = 0):
    """(prompt ids, generation length) per request, seeded; prompts from the validation split."""
    return common_stream(token_file(data, "val"), n, mean_len, seed=seed)


def _engine_run(model, stream, policy, max_batch, exit):
    r = serve_offline(model, stream, policy, max_batch, exit, max_len=64 + 256 + 1)
    return r["seconds"], r["tokens"], r["depths"], r["occupancy"]


def _static_generate(model, stream, max_batch, strategy_factory):
    """Static batching with the simple lock-step generator (requests in arrival order)."""
    t = time.perf_counter()
    tokens, depths = 0, []
    for i in range(0, len(stream), max_batch):
        chunk = stream[i : i + max_batch]
        # one batch = one max_new_tokens; shorter requests stop early but hold their slot
        res = generate(
            model,
            [p for p, _ in chunk],
            SamplingParams(max_new_tokens=max(g for _, g in chunk), ignore_eos=True),
            strategy=strategy_factory(),
        )
        for r, (_, g) in zip(res, chunk):
            tokens += g
            depths += r.depths[:g]
    return time.perf_counter() - t, tokens, depths, {}


def run(
    dense: str,
    recursive: str,
    data: str = "data/stdlib",
    exit_model: str | None = None,
    threshold: float = 0.3,
    n_requests: int = 256,
    max_batch: int = 32,
    threads: int | None = None,
    out: str | None = "results/depthwise.json",
    mean_len: float = 128.0,
    mor: str | None = None,
    deep_kvs: tuple[str, ...] = ("catch-up",),
) -> list[dict]:
    """Trained models under every batching policy on one request stream (the table in
    BENCHMARKS.md ``depthwise``). ``deep_kvs``: the recursive model's loop exit runs once per
    ``ExitMode.deep_kv`` choice (catch-up, propagate, skip)."""

    threads = set_threads(threads)
    env = environment(threads)
    warnings.simplefilter("ignore", ExitWarning)
    stream = request_stream(data, n_requests, mean_len)
    dense_lm = load_model(dense)
    rec_lm = load_model(recursive)
    rec_cfg = rec_lm.config
    exit_step = rec_cfg.exits.steps[0] if rec_cfg.exits.steps else None
    nll = {
        m: perplexity(m, data, seq_len=256, batch_size=8, device=bench_device())["nll"]
        for m in {dense, recursive, exit_model, mor}
        if m
    }
    configs = [
        ("vanilla, static batching", dense, dense_lm, "static", None),
        ("vanilla, continuous batching", dense, dense_lm, "continuous", None),
        ("vanilla, depth-wise batching", dense, dense_lm, "depthwise", None),
        ("recursive, continuous batching, no exit", recursive, rec_lm, "continuous", None),
        ("recursive, depth-wise batching, no exit", recursive, rec_lm, "depthwise", None),
    ]
    if exit_step is not None:
        for kv in deep_kvs:
            mode = ExitMode(exit_step, threshold, kv)
            tag = "" if kv == "catch-up" else f" ({kv})"
            configs += [
                (
                    f"recursive + loop exit{tag}, continuous batching",
                    recursive,
                    rec_lm,
                    "continuous",
                    mode,
                ),
                (
                    f"recursive + loop exit{tag}, depth-wise batching",
                    recursive,
                    rec_lm,
                    "depthwise",
                    mode,
                ),
            ]
    if mor:
        mor_lm = load_model(mor)
        configs += [
            ("MoR, continuous batching", mor, mor_lm, "continuous", None),
            ("MoR, depth-wise batching", mor, mor_lm, "depthwise", None),
        ]
    rows = []
    # warm up both models
    _engine_run(dense_lm.model, stream[:4], "continuous", max_batch, None)
    _engine_run(rec_lm.model, stream[:4], "depthwise", max_batch, None)
    for label, path, lm, policy, mode in configs:
        dt, tokens, depths, occ = _engine_run(lm.model, stream, policy, max_batch, mode)
        rows.append(
            _row(
                label,
                path,
                policy,
                mode,
                dt,
                tokens,
                depths,
                occ,
                lm.model.n_steps,
                nll[path],
                env,
                max_batch,
                n_requests,
            )
        )
        print(f"  {label:45s} {tokens / dt:8.1f} tok/s  depth {np.mean(depths):.2f}", flush=True)
    if exit_model:
        ex_lm = load_model(exit_model)
        ls = ex_lm.config.exits.steps[0]

        def factory():
            return make_strategy(
                ex_lm.model, "calm", threshold=threshold, min_exit=ls, sync_batch=True
            )

        dt, tokens, depths, occ = _static_generate(ex_lm.model, stream, max_batch, factory)
        label = "naive dense early exit, static batch"
        rows.append(
            _row(
                label,
                exit_model,
                "static",
                ExitMode(ls, threshold),
                dt,
                tokens,
                depths,
                occ,
                ex_lm.model.n_steps,
                nll[exit_model],
                env,
                max_batch,
                n_requests,
            )
        )
        print(f"  {label:45s} {tokens / dt:8.1f} tok/s  depth {np.mean(depths):.2f}", flush=True)
    base = {r["label"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        r["x_vanilla_static"] = r["tokens_per_s"] / base["vanilla, static batching"]
        r["x_vanilla_continuous"] = r["tokens_per_s"] / base["vanilla, continuous batching"]
    write_rows(rows, out)
    return rows


def _row(label, path, policy, mode, dt, tokens, depths, occ, n_steps, nll, env, max_batch, n):
    return {
        "bench": "depthwise",
        "label": label,
        "model": path,
        "policy": policy,
        "exit": None
        if mode is None
        else {"step": mode.step, "threshold": mode.threshold, "deep_kv": mode.deep_kv},
        "requests": n,
        "max_batch": max_batch,
        "seconds": dt,
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "mean_depth": float(np.mean(depths)),
        "n_steps": n_steps,
        "exit_rate": float(np.mean([d < n_steps for d in depths])),
        "val_nll": nll,
        "occupancy": occ,
        "env": env,
    }


# ---------------------------------------------------------------------- synthetic exits
SYNTHETIC_RATES = (0.0, 0.25, 0.5, 0.75)
MOR_SHARES = (1 / 3, 1 / 3, 1 / 3)


def synthetic_models(
    preset: str, device: str = "cpu", seed: int = 0, dtype: str | None = None
) -> dict:
    """Random-weight models of one shape: vanilla (the preset), recursive (cycle, 2 loops
    of half the layers: the same depth) and MoR-like (middle-cycle, 3 recursions, token-
    choice router; the depth rounded to 1 + 3k + 1 layers)."""
    import torch

    from earlyexit.config import ModelConfig
    from earlyexit.device import resolve_dtype
    from earlyexit.models.decoder import Decoder

    base = ModelConfig.from_name(preset)
    L = base.n_layers
    mor_layers = 2 + 3 * max(1, round((L - 2) / 3))
    configs = {
        "vanilla": ModelConfig.from_name(preset),
        "recursive": ModelConfig.from_name(
            preset, n_layers=2 * (L // 2), sharing={"scheme": "cycle", "loops": 2}
        ),
        "mor": ModelConfig.from_name(
            preset,
            n_layers=mor_layers,
            sharing={"scheme": "middle_cycle", "loops": 3},
            router={"kind": "token"},
        ),
    }
    out = {}
    for name, cfg in configs.items():
        with torch.device(device):
            m = Decoder(cfg)
        m.init_weights(torch.Generator(device=device).manual_seed(seed))
        if dtype is not None:  # e.g. bf16 weights on a GPU (`bench --dtype`)
            m.to(resolve_dtype(dtype, torch.device(device)))
        out[name] = m.eval()
    return out


def synthetic_stream(vocab: int, n: int, mean_len: float, max_prompt: int, seed: int = 0):
    """(random prompt ids, generation length) per request, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        plen = int(rng.integers(8, max_prompt + 1))
        glen = int(np.clip(round(rng.normal(mean_len, mean_len / 4)), 4, 4 * mean_len))
        out.append((rng.integers(0, vocab, plen).tolist(), glen))
    return out


def run_synthetic(
    presets: tuple[str, ...] = ("stdlib-small", "smollm-135m"),
    max_batches: tuple[int, ...] = (8, 16, 32),
    exit_rates: tuple[float, ...] = SYNTHETIC_RATES,
    n_requests: int = 64,
    mean_len: float = 32.0,
    max_prompt: int = 32,
    threads: int | None = None,
    out: str | None = "results/depthwise_synthetic.json",
    repeats: int = 1,
    exit_vocab: int | None = None,
    deep_kvs: tuple[str, ...] = ("catch-up",),
) -> list[dict]:
    """The synthetic-exit sweep: a *systems* measurement (random weights; each token's exit
    after loop 1 of 2, or its MoR recursions, drawn from fixed distributions) of what the
    engine's batching policies deliver at each model shape. Ratios are to vanilla
    continuous batching at the same shape and max batch, in the same run; with
    ``repeats`` > 1 every configuration of a (shape, max batch) group runs once per round,
    rounds alternate the order, and each row reports the median time. With ``exit_vocab``
    N every loop-exit configuration also runs with its decisions over an N-token pruned
    head (the first N ids: which tokens does not change the cost). ``deep_kvs``: what an
    exited token leaves in loop 2 (``ExitMode.deep_kv``), one set of rows each."""
    from earlyexit.engine import SyntheticDepth

    threads = set_threads(threads)
    env = environment(threads)
    rows = []
    for preset in presets:
        models = synthetic_models(preset, bench_device(), dtype=bench_dtype())
        vocab = models["vanilla"].config.vocab_size
        stream = synthetic_stream(vocab, n_requests, mean_len, max_prompt)
        max_len = max_prompt + 4 * int(mean_len) + 2
        K = models["recursive"].config.n_blocks  # loop 1 ends after K steps
        for mb in max_batches:
            runs = [
                ("vanilla", "static", None, None, "vanilla", None),
                ("vanilla", "continuous", None, None, "vanilla", None),
            ]
            heads = [None] if exit_vocab is None else [None, exit_vocab]
            for rate in exit_rates:
                syn = SyntheticDepth(exit_rate=rate)
                for head in heads:
                    for kv in deep_kvs:
                        what = f"exit {rate:.0%}" + ("" if head is None else f" v{head}")
                        what += "" if kv == "catch-up" else f" {kv}"
                        mode = ExitMode(K, 0.0, kv)
                        for policy in ("continuous", "depthwise"):
                            runs.append(("recursive", policy, mode, syn, what, head))
            for policy in ("continuous", "depthwise"):
                mor = SyntheticDepth(mor_shares=MOR_SHARES)
                runs.append(("mor", policy, None, mor, "MoR 1/3", None))
            serve_offline(models["vanilla"], stream[:4], "continuous", mb, max_len=max_len)
            times: list[list[float]] = [[] for _ in runs]
            results: list[dict] = [{} for _ in runs]
            for r in range(repeats):
                order = list(enumerate(runs))
                for i, (key, policy, mode, syn, _, head) in order if r % 2 == 0 else order[::-1]:
                    res = serve_offline(
                        models[key],
                        stream,
                        policy,
                        mb,
                        mode,
                        max_len,
                        synthetic=syn,
                        exit_vocab=None if head is None else range(head),
                    )
                    times[i].append(res["seconds"])
                    results[i] = res
            group = []
            for i, (model_key, policy, mode, syn, what, head) in enumerate(runs):
                m, res = models[model_key], results[i]
                seconds = statistics.median(times[i])
                occ = res["occupancy"]
                row = {
                    "bench": "depthwise-synthetic",
                    "preset": preset,
                    "model": model_key,
                    "policy": policy,
                    "decisions": what,
                    "exit_rate": None if syn is None else syn.exit_rate,
                    "exit_vocab": head,
                    "deep_kv": None if mode is None else mode.deep_kv,
                    "max_batch": mb,
                    "requests": n_requests,
                    "tokens": res["tokens"],
                    "seconds": seconds,
                    "seconds_all": times[i],
                    "tokens_per_s": res["tokens"] / seconds,
                    "mean_depth": res["mean_depth"],
                    "n_steps": m.n_steps,
                    "block_calls": occ["block_calls"],
                    "rows_per_block_call": occ["mean_rows_per_block_call"],
                    "ms_per_block_call": 1e3 * seconds / max(occ["block_calls"], 1),
                    "params": m.config.param_counts()["total"],
                    "env": env,
                }
                group.append(row)
                print(
                    f"  {preset:13s} mb {mb:2d}  {model_key:9s} {policy:10s} {what:22s} "
                    f"{row['tokens_per_s']:8.1f} tok/s  depth {row['mean_depth']:5.2f}  "
                    f"{row['rows_per_block_call']:5.1f} rows/call  {row['ms_per_block_call']:6.2f} ms/call",
                    flush=True,
                )
            base = next(r["tokens_per_s"] for r in group if r["policy"] == "continuous")
            for r in group:
                r["x_vanilla_continuous"] = r["tokens_per_s"] / base
            rows += group
            write_rows(rows, out)
    return rows
