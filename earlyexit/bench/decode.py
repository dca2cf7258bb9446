"""Benchmark ``decode``: is our plain full-depth decoder fast?

    earlyexit bench decode [--preset smollm-135m] [--batch-sizes 1 8] [--new-tokens 128]
    python -m earlyexit.bench.decode ...

- Baseline in the same process: ``transformers`` ``generate()`` (greedy) on identical weights,
  fp32: a random-init model of the preset's shape built in ``transformers``, or with
  ``--model DIR`` a real checkpoint (ours, a Hugging Face directory, or a GGUF file),
  exported and loaded by ``transformers`` from disk. Runs are interleaved (order alternates
  each repetition) and the median is reported; both sides generate exactly ``new_tokens``
  tokens per row and the outputs are checked identical token for token.
- Our decoder twice: built in memory from the ``transformers`` weights (``earlyexit``), and
  loaded from a checkpoint on disk with ``earlyexit.load`` as every user path does
  (``earlyexit-loaded``): the two must be within noise of each other (loading once left the
  weights in the file's memory map, 3x slower).
- Limits measured in the same run: memory copy bandwidth (STREAM convention: bytes read +
  written per second over 256 MiB buffers; re-measured in every repetition, median) and
  the batch-1 bound = weight bytes touched
  per token / copy bandwidth; plus the *kernel ceiling*: the same weights multiplied by a
  (batch, d) input through the same linear kernel, with nothing else, per token.
- Writes JSON rows (config, environment, raw timings) to ``--out``; BENCHMARKS.md quotes them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from earlyexit.bench.common import cpu_name
from earlyexit.config import ModelConfig
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.models import kernels
from earlyexit.models.kernels import linear


def environment(threads: int, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(
    nbytes: int = 256 * 2**20, reps: int = 10, device: torch.device | None = None
) -> float:
    """Bytes read + written per second copying ``nbytes`` on ``device`` (median of ``reps``)."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        nbytes *= 8  # 2 GiB: large enough to leave the GPU's caches
    a = torch.randn(nbytes // 4, device=device)
    b = torch.randn(nbytes // 4, device=device)
    times = []
    for _ in range(reps + 2):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times[2:])


def bytes_per_token(cfg: ModelConfig, element_size: int = 4) -> int:
    """Weight bytes one batch-1 decode step must read: every block, the final norm, the head
    (the tied embedding matrix serves as head) and one embedding row."""
    c = cfg.param_counts()
    head = cfg.vocab_size * cfg.d_model
    return element_size * (c["non_embedding"] + head + cfg.d_model)


def kernel_ceiling(model, batch: int, reps: int = 5) -> float:
    """Tokens/s of the linear layers alone (same weights, same kernel), per decode step."""
    ws = [(m.weight, m.bias) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ws.append((model.head_weight(), None))
    w0 = ws[0][0]
    xs = {
        w.shape[1]: torch.randn(batch, 1, w.shape[1], device=w0.device, dtype=w0.dtype)
        for w, _ in ws
    }
    times = []
    with torch.inference_mode():
        for _ in range(reps + 2):
            _sync(w0.device)
            t = time.perf_counter()
            for w, b in ws:
                linear(xs[w.shape[1]], w, b)
            _sync(w0.device)
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times[2:])


ABLATION = "earlyexit-F.linear"  # our decoder with every linear through F.linear (MKL)
ONEDNN = "earlyexit-oneDNN"  # our decoder with every linear through oneDNN


COMPILED = "earlyexit-compiled"  # the static-shape decode step under torch.compile
LOADED = "earlyexit-loaded"  # our decoder as earlyexit.load(DIR) gives it to users


def _run_ours(
    model, prompts: torch.Tensor, n: int, kernel: str | None = None, strategy=None
) -> list[list[int]]:
    """``kernel``: force every linear through it (an ablation); None: the chosen kernels."""
    with kernels.forced(kernel):
        res = generate(
            model,
            prompts.tolist(),
            SamplingParams(max_new_tokens=n, ignore_eos=True),
            strategy=strategy,
        )
    return [r.token_ids for r in res]


def time_split(model, prompts: torch.Tensor, n: int) -> dict[str, float]:
    """Milliseconds per generated token (prefill included) in the linear kernels, in
    attention (KV append + attend) and in everything else, from one greedy run of ``n``
    tokens with a clock around every linear and attention call (their cost is ~1 µs a call)."""
    from earlyexit.models import attention

    spent = {"linears": 0.0, "attention": 0.0}

    def timed(fn, what):
        def call(*a):
            t = time.perf_counter()
            out = fn(*a)
            spent[what] += time.perf_counter() - t
            return out

        return call

    saved_tables = {k: list(v) for k, v in kernels._TABLES.items()}
    saved_attend = dict(attention.ATTEND)
    try:
        for table in kernels._TABLES.values():
            table[:] = [timed(f, "linears") for f in table]
        for k, f in saved_attend.items():
            attention.ATTEND[k] = timed(f, "attention")
        t = time.perf_counter()
        _run_ours(model, prompts, n)
        total = time.perf_counter() - t
    finally:
        for k, v in saved_tables.items():
            kernels._TABLES[k][:] = v
        attention.ATTEND.update(saved_attend)
    per = 1e3 / n
    return {
        "total_ms": total * per,
        "linears_ms": spent["linears"] * per,
        "attention_ms": spent["attention"] * per,
        "other_ms": (total - spent["linears"] - spent["attention"]) * per,
    }


def _run_hf(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :].tolist()


def run(
    preset: str = "smollm-135m",
    batch_sizes: tuple[int, ...] = (1, 8),
    new_tokens: int = 128,
    prompt_len: int = 16,
    repeats: int = 3,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    compile: bool = False,
    model: str | None = None,
) -> list[dict]:
    """Run the benchmark; return JSON-ready rows. ``model``: a real checkpoint instead of
    the preset's random weights. On CUDA the oneDNN ablation (a CPU
    kernel choice) is skipped and bandwidth is the GPU's own copy bandwidth. ``compile``
    adds our static-shape decode step under ``torch.compile`` (CUDA graphs on CUDA); one
    compiled step object serves every run of a batch size, so compilation is paid in the
    warm-up, not in the timed runs."""
    import tempfile

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    import earlyexit
    from earlyexit.decoding.full import FullDepth
    from earlyexit.device import resolve_device, resolve_dtype
    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.io.hf import config_to_hf, from_transformers, hf_export

    transformers.utils.logging.set_verbosity_error()
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev) or torch.float32
    tmp = tempfile.TemporaryDirectory(prefix="earlyexit-bench-decode-")
    if model is None:
        cfg = ModelConfig.from_name(preset)
        hf_cfg = AutoConfig.for_model(**config_to_hf(cfg))
        hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
        hf = hf.eval().to(dev, dt)
        save_checkpoint(from_transformers(hf), Path(tmp.name) / "ours")
        loaded = earlyexit.load(Path(tmp.name) / "ours", device=dev, dtype=dt, draft=None).model
    else:  # a real model: ours as users load it, transformers from its own export on disk
        loaded = earlyexit.load(model, device=dev, dtype=dt, draft=None).model
        cfg = loaded.config
        preset = str(model)
        hf_export(loaded, Path(tmp.name) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(
            Path(tmp.name) / "hf", attn_implementation="sdpa", torch_dtype=dt
        )
        hf = hf.eval().to(dev)
    ours = from_transformers(hf)  # built in memory from the same weights
    tmp.cleanup()
    env = environment(threads, dev, dt)
    bpt = bytes_per_token(cfg, torch.empty((), dtype=dt).element_size())
    on_cpu = dev.type == "cpu"
    rows: list[dict] = []
    g = torch.Generator().manual_seed(seed)
    for bs in batch_sizes:
        prompts = torch.randint(0, cfg.vocab_size, (bs, prompt_len), generator=g).to(dev)
        bws = [copy_bandwidth(device=dev)]  # re-measured every repetition: the machine is noisy
        _run_ours(ours, prompts, 4), _run_hf(hf, prompts, 4)  # warm up both
        run_ours = functools.partial(_run_ours, ours, prompts, new_tokens)
        run_hf = functools.partial(_run_hf, hf, prompts, new_tokens)
        run_ablation = functools.partial(_run_ours, ours, prompts, new_tokens, kernel="mkl")
        run_onednn = functools.partial(_run_ours, ours, prompts, new_tokens, kernel="onednn")
        run_loaded = functools.partial(_run_ours, loaded, prompts, new_tokens)
        compiled = FullDepth(compile=True)
        run_compiled = functools.partial(_run_ours, ours, prompts, new_tokens, strategy=compiled)
        if compile:
            run_compiled(), run_compiled()  # compile (and capture graphs) before timing
        run_loaded()  # warm up
        if on_cpu and dt in (torch.float32, torch.bfloat16):  # which kernels were chosen, and why
            env["linear_kernels"] = kernels.status()
            choice = kernels.choice(dt)
            env["linear_seconds_per_pass"] = choice.seconds if choice else {}
        onednn_ok = on_cpu and kernels.linear_choice.onednn_available()
        impls = ["earlyexit", LOADED, "transformers"] + ([ABLATION] if on_cpu else [])
        impls += [ONEDNN] if onednn_ok else []
        impls += [COMPILED] if compile else []
        times: dict[str, list[float]] = {k: [] for k in impls}
        outs: dict[str, list] = {}
        for r in range(repeats):
            bws.append(copy_bandwidth(device=dev))
            order = [
                ("earlyexit", run_ours),
                ("transformers", run_hf),
                (LOADED, run_loaded),
                (ABLATION, run_ablation),
                (ONEDNN, run_onednn),
                (COMPILED, run_compiled),
            ]
            order = [(k, f) for k, f in order if k in impls]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                outs[name] = fn()
                times[name].append(time.perf_counter() - t)
        identical = outs["earlyexit"] == outs["transformers"]
        mismatch_rows = sum(a != b for a, b in zip(outs["earlyexit"], outs["transformers"]))
        tps = {k: bs * new_tokens / statistics.median(v) for k, v in times.items()}
        ceiling = kernel_ceiling(ours, bs)
        split = time_split(ours, prompts, new_tokens) if on_cpu else None
        bw = statistics.median(bws)
        common = dict(
            bench="decode",
            preset=preset,
            batch_size=bs,
            new_tokens=new_tokens,
            prompt_len=prompt_len,
            repeats=repeats,
            env=env,
        )
        for name in impls:
            rows.append({**common, "impl": name, "seconds": times[name], "tokens_per_s": tps[name]})
        summary = {
            **common,
            "impl": "summary",
            "speedup_vs_transformers": tps["earlyexit"] / tps["transformers"],
            "loaded_speedup_vs_transformers": tps[LOADED] / tps["transformers"],
            "loaded_vs_in_memory": tps[LOADED] / tps["earlyexit"],
            "loaded_outputs_identical": outs[LOADED] == outs["transformers"],
            "speedup_of_chosen_over_F.linear": tps["earlyexit"] / tps[ABLATION] if on_cpu else None,
            "speedup_of_chosen_over_onednn": tps["earlyexit"] / tps[ONEDNN] if onednn_ok else None,
            "ablation_outputs_identical": outs[ABLATION] == outs["transformers"]
            if on_cpu
            else None,
            "outputs_identical": identical,
            "compiled_speedup_vs_transformers": tps[COMPILED] / tps["transformers"]
            if compile
            else None,
            "compiled_outputs_identical": outs[COMPILED] == outs["transformers"]
            if compile
            else None,
            "rows_differing": mismatch_rows,
            "kernel_ceiling_tokens_per_s": ceiling,
            "ms_per_token_split": split,
            "fraction_of_kernel_ceiling": tps["earlyexit"] / ceiling,
            "copy_bandwidth_GBps": bw / 1e9,
            "copy_bandwidth_samples_GBps": [b / 1e9 for b in bws],
            "weight_bytes_per_token": bpt,
        }
        if bs == 1:
            bound = bw / bpt
            summary.update(
                bandwidth_bound_tokens_per_s=bound,
                fraction_of_bandwidth_bound=tps["earlyexit"] / bound,
            )
        rows.append(summary)
    return rows


def _tps(by_impl: dict, impl: str) -> str:
    return f"{by_impl[impl]['tokens_per_s']:.1f}" if impl in by_impl else "–"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| batch | earlyexit tok/s | loaded from disk tok/s | transformers tok/s | speedup (loaded) | identical | all F.linear tok/s | all oneDNN tok/s | compiled tok/s | kernel ceiling | of ceiling | of bandwidth bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {}
    for r in rows:
        by.setdefault(r["batch_size"], {})[r["impl"]] = r
    for bs, d in by.items():
        s = d["summary"]
        frac = (
            f"{s['fraction_of_bandwidth_bound']:.0%} of {s['bandwidth_bound_tokens_per_s']:.0f}"
            if "fraction_of_bandwidth_bound" in s
            else "–"
        )
        lines.append(
            f"| {bs} | {d['earlyexit']['tokens_per_s']:.1f} | {_tps(d, LOADED)} | {d['transformers']['tokens_per_s']:.1f} | "
            f"{s['speedup_vs_transformers']:.2f}x ({s.get('loaded_speedup_vs_transformers', float('nan')):.2f}x) | "
            f"{s['outputs_identical'] and s.get('loaded_outputs_identical', True)} | {_tps(d, ABLATION)} | {_tps(d, ONEDNN)} | {_tps(d, COMPILED)} | {s['kernel_ceiling_tokens_per_s']:.1f} | "
            f"{s['fraction_of_kernel_ceiling']:.0%} | {frac} |"
        )
    return "\n".join(lines)


def main(
    preset: str = "smollm-135m",
    batch_sizes: list[int] | tuple[int, ...] = (1, 8),
    new_tokens: int = 128,
    prompt_len: int = 16,
    repeats: int = 3,
    threads: int | None = None,
    out: str | None = "results/decode.json",
    as_json: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    compile: bool = False,
    model: str | None = None,
) -> list[dict]:
    """Run, write the JSON rows to ``out``, print a Markdown table (or the rows)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        from earlyexit.errors import EarlyExitError

        raise EarlyExitError(
            "bench decode compares against transformers: pip install 'earlyexit[hf]'"
        ) from None
    rows = run(
        preset,
        tuple(batch_sizes),
        new_tokens,
        prompt_len,
        repeats,
        threads,
        device=device,
        dtype=dtype,
        compile=compile,
        model=model,
    )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")
    if as_json:
        print(json.dumps(rows))
    else:
        env = rows[0]["env"]
        print(
            f"decode benchmark: {model or preset}, {env['dtype']}, {env.get('gpu', env['cpu'])}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}"
        )
        print(
            f"copy bandwidth {rows[-1]['copy_bandwidth_GBps']:.1f} GB/s; {rows[-1]['weight_bytes_per_token'] / 1e6:.0f} MB of weights per token"
        )
        print(format_table(rows))
        for r in rows:
            sp = r.get("ms_per_token_split")
            if r["impl"] == "summary" and sp:
                print(
                    f"batch {r['batch_size']}: {sp['total_ms']:.1f} ms per token step = linears "
                    f"{sp['linears_ms']:.1f} + attention {sp['attention_ms']:.1f} + other ops "
                    f"{sp['other_ms']:.1f} (one timed run)"
                )
        if "linear_kernels" in env:
            print(f"linear kernels chosen: {env['linear_kernels']}")
            for bucket, t in sorted(
                env["linear_seconds_per_pass"].items(), key=lambda kv: int(kv[0])
            ):
                if int(bucket) in (*batch_sizes, 1):
                    ts = ", ".join(
                        f"{k} {v * 1e3:.1f} ms" for k, v in sorted(t.items(), key=lambda kv: kv[1])
                    )
                    print(f"  measured at {bucket} rows (one pass over the timed weights): {ts}")
        if out:
            print(f"rows written to {out}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm-135m")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/decode.json")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    main(a.preset, a.batch_sizes, a.new_tokens, a.prompt_len, a.repeats, a.threads, a.out, a.json)
