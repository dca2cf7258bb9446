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
from earlyexit.evaluation.metrics import agreement
from earlyexit.evaluation.perplexity import perplexity
from earlyexit.training.data import token_file


def request_stream(data: str, n: int = 256, mean_len: float = 128.0, seed: int = 0):
    """(prompt ids, generation length) per request, seeded; prompts from the validation split."""
    return common_stream(token_file(data, "val"), n, mean_len, seed=seed)


def _engine_run(model, stream, policy, max_batch, exit, exit_vocab=None):
    max_len = max(len(p) + g for p, g in stream) + 1
    return serve_offline(model, stream, policy, max_batch, exit, max_len, exit_vocab=exit_vocab)


def _static_generate(model, stream, max_batch, strategy_factory) -> dict:
    """Static batching with the simple lock-step generator (requests in arrival order)."""
    t = time.perf_counter()
    tokens, depths, outputs = 0, [], []
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
            outputs.append(list(r.token_ids[:g]))
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens": tokens, "depths": depths, "outputs": outputs, "occupancy": {}}


def run(
    dense: str,
    recursive: str,
    data: str = "data/stdlib",
    exit_model: str | None = None,
    threshold: float = 0.3,
    n_requests: int = 256,
    max_batch: int | tuple[int, ...] = 32,
    threads: int | None = None,
    out: str | None = "results/depthwise.json",
    mean_len: float = 128.0,
    mor: str | None = None,
    deep_kvs: tuple[str, ...] = ("catch-up",),
    repeats: int = 1,
    exit_vocab: int | None = None,
) -> list[dict]:
    """Trained models under every batching policy on one request stream (the table in
    BENCHMARKS.md ``depthwise``). ``deep_kvs``: the recursive model's loop exit runs once per
    ``ExitMode.deep_kv`` choice (catch-up, propagate, skip). ``exit_vocab`` N: the loop exit
    also runs with its decisions over the N most frequent tokens of ``data``'s training
    split (the engine's pruned exit head). With ``repeats`` > 1 every configuration runs
    once per round, rounds alternate the order, and each row reports the median time.
    ``max_batch``: one max batch, or several (one group of rows each, ratios within it).

    Quality sits beside speed: each row's outputs (greedy) are compared, request by request,
    with the same model's full-depth outputs under continuous batching (``rouge_l``,
    ``token_match``), and each model's validation NLL is given."""

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
    vocab = None
    if exit_vocab is not None and exit_step is not None:
        from earlyexit.decoding.speculative import frequent_tokens

        vocab = frequent_tokens(token_file(data, "train"), exit_vocab, rec_cfg.vocab_size)
    # (label, checkpoint, lm, policy, exit mode, pruned exit head)
    configs = [
        ("vanilla, static batching", dense, dense_lm, "static", None, None),
        ("vanilla, continuous batching", dense, dense_lm, "continuous", None, None),
        ("vanilla, depth-wise batching", dense, dense_lm, "depthwise", None, None),
        ("recursive, continuous batching, no exit", recursive, rec_lm, "continuous", None, None),
        ("recursive, depth-wise batching, no exit", recursive, rec_lm, "depthwise", None, None),
    ]
    if exit_step is not None:
        for head in [None] if vocab is None else [None, vocab]:
            for kv in deep_kvs:
                mode = ExitMode(exit_step, threshold, kv)
                tags = ([] if kv == "catch-up" else [kv]) + (
                    [] if head is None else [f"v{len(head)}"]
                )
                tag = f" ({', '.join(tags)})" if tags else ""
                for policy, name in (("continuous", "continuous"), ("depthwise", "depth-wise")):
                    label = f"recursive + loop exit{tag}, {name} batching"
                    configs.append((label, recursive, rec_lm, policy, mode, head))
    if mor:
        mor_lm = load_model(mor)
        configs += [
            ("MoR, continuous batching", mor, mor_lm, "continuous", None, None),
            ("MoR, depth-wise batching", mor, mor_lm, "depthwise", None, None),
        ]
    if exit_model:
        ex_lm = load_model(exit_model)
        ls = ex_lm.config.exits.steps[0]
        label = "naive dense early exit, static batch"
        configs.append((label, exit_model, ex_lm, "static", ExitMode(ls, threshold), None))

    def once(path, lm, policy, mode, head, max_batch) -> dict:
        if path == exit_model and mode is not None:

            def factory():
                return make_strategy(
                    lm.model,
                    "calm",
                    threshold=threshold,
                    min_exit=mode.step,
                    sync_batch=True,
                    allow_untrained=True,
                )

            return _static_generate(lm.model, stream, max_batch, factory)
        return _engine_run(lm.model, stream, policy, max_batch, mode, head)

    rows: list[dict] = []
    for mb in (max_batch,) if isinstance(max_batch, int) else tuple(max_batch):
        rows += _serve_group(configs, once, mb, repeats, dense, recursive, exit_model)
        for r in rows[-len(configs) :]:
            r.update(val_nll=nll[r["model"]], env=env, requests=n_requests, mean_len=mean_len)
        write_rows(rows, out)
    return rows


def _serve_group(configs, once, max_batch, repeats, dense, recursive, exit_model) -> list[dict]:
    """Every configuration at one max batch, in interleaved rounds; rows with the median
    time, agreement with the model's own full depth, and ratios within the group."""
    # warm up every model (first calls allocate and pick kernels)
    for lm in {id(c[2]): c[2] for c in configs}.values():
        _engine_run(lm.model, [([1, 2, 3, 4], 4)] * 4, "continuous", max_batch, None)
    times: list[list[float]] = [[] for _ in configs]
    results: list[dict] = [{} for _ in configs]
    for r in range(max(1, repeats)):
        order = list(enumerate(configs))
        for i, (label, path, lm, policy, mode, head) in order if r % 2 == 0 else order[::-1]:
            res = once(path, lm, policy, mode, head, max_batch)
            times[i].append(res["seconds"])
            results[i] = res
            print(
                f"  mb {max_batch} [{r + 1}/{repeats}] {label:58s} "
                f"{res['tokens'] / res['seconds']:8.1f} tok/s  depth {np.mean(res['depths']):.2f}",
                flush=True,
            )
    full = {
        path: results[i]["outputs"]
        for i, (_, path, _, policy, mode, _) in enumerate(configs)
        if policy == "continuous" and mode is None
    }
    rows = []
    for i, (label, path, lm, policy, mode, head) in enumerate(configs):
        res, seconds = results[i], statistics.median(times[i])
        row = _row(label, path, policy, mode, seconds, res, lm.model.n_steps, max_batch)
        row["seconds_all"] = times[i]
        row["exit_vocab"] = None if head is None else len(head)
        ref = full.get(path, full.get(dense) if path == exit_model else None)
        if ref is not None:
            row.update(agreement(res["outputs"], ref))
        rows.append(row)
    base = {r["label"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        r["x_vanilla_static"] = r["tokens_per_s"] / base["vanilla, static batching"]
        r["x_vanilla_continuous"] = r["tokens_per_s"] / base["vanilla, continuous batching"]
        if r["model"] == recursive:
            r["x_recursive_continuous"] = (
                r["tokens_per_s"] / base["recursive, continuous batching, no exit"]
            )
    return rows


def _row(label, path, policy, mode, seconds, res, n_steps, max_batch) -> dict:
    depths, occ = res["depths"], res["occupancy"]
    return {
        "bench": "depthwise",
        "label": label,
        "model": path,
        "policy": policy,
        "exit": None
        if mode is None
        else {"step": mode.step, "threshold": mode.threshold, "deep_kv": mode.deep_kv},
        "max_batch": max_batch,
        "seconds": seconds,
        "tokens": res["tokens"],
        "tokens_per_s": res["tokens"] / seconds,
        "mean_depth": float(np.mean(depths)),
        "n_steps": n_steps,
        "exit_rate": float(np.mean([d < n_steps for d in depths])),
        "occupancy": occ,
        "rows_per_block_call": occ.get("mean_rows_per_block_call"),
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
