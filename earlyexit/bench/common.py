"""Shared benchmark plumbing: the benchmark device, environment rows, request streams, the
offline engine harness. The quality metrics and validation prompts are ``evaluation/metrics.py``.

Benchmarks measure and write JSON rows; plots (``bench/plots.py``) only read those rows.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The device every benchmark in this process runs on (``earlyexit bench --device/--dtype``).
_DEVICE: dict = {"device": "cpu", "dtype": None}


def use_device(device: str = "auto", dtype: str | None = None) -> torch.device:
    """Set the device (and weight dtype) benchmarks load models on; returns the device.
    ``auto`` is CUDA when present. Raises DeviceError for an unavailable device or dtype."""
    from earlyexit.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)  # validate now, not in the middle of a run
    if dtype == "auto":  # what auto means on this machine, recorded with every row
        dtype = str(dt).removeprefix("torch.")
    _DEVICE.update(device=str(dev), dtype=dtype)
    return dev


def bench_device() -> str:
    return _DEVICE["device"]


def bench_dtype() -> str | None:
    """The weight dtype name set by ``use_device`` (None: as stored / as built)."""
    return _DEVICE["dtype"]


def load_model(path):
    """``earlyexit.load`` on the benchmark device and dtype (no draft attached: benchmarks
    measure the model they name; ``bench/drafts.py`` attaches drafts itself)."""
    import earlyexit

    return earlyexit.load(path, device=_DEVICE["device"], dtype=_DEVICE["dtype"], draft=None)


def sync() -> None:
    """Wait for queued device work (timing on CUDA measures finished work, not launches)."""
    if _DEVICE["device"].startswith("cuda"):
        torch.cuda.synchronize()


def environment(threads: int, device: str | None = None) -> dict:
    device = device or _DEVICE["device"]
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "device": device,
        "dtype": _DEVICE["dtype"] or "as stored",
        "date": time.strftime("%Y-%m-%d"),
    }
    if device == "cpu":  # which attention decode ran on (compiled kernel or SDPA, and why)
        from earlyexit.models import decode_kernel

        env["decode_attention"] = decode_kernel.status().split(":")[0]
        from earlyexit.models import kernels

        env["linear_kernels"] = kernels.status()  # which kernel per dtype and row count
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def set_threads(threads: int | None) -> int:
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def write_rows(rows: list[dict], out: str | Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=1) + "\n")


def request_stream(
    val_tokens: np.ndarray,
    n: int,
    mean_len: float,
    max_prompt: int = 64,
    min_gen: int = 16,
    max_gen: int = 256,
    seed: int = 0,
) -> list[tuple[list[int], int]]:
    """(prompt ids, generation length) per request, seeded: prompts of 8..``max_prompt``
    validation tokens, lengths ~ Normal(mean, mean/4) clipped to [min_gen, max_gen]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        plen = int(rng.integers(8, max_prompt + 1))
        start = int(rng.integers(0, len(val_tokens) - plen - 1))
        glen = int(np.clip(round(rng.normal(mean_len, mean_len / 4)), min_gen, max_gen))
        out.append((val_tokens[start : start + plen].astype(np.int64).tolist(), glen))
    return out


def serve_offline(
    model,
    stream,
    policy: str,
    max_batch: int,
    exit=None,
    max_len=None,
    synthetic=None,
    exit_vocab=None,
) -> dict:
    """Serve ``stream`` (every request arriving at once) with the engine; throughput, each
    generated token's depth, every request's output ids and the engine's occupancy.
    ``synthetic``: depth decisions drawn from fixed distributions
    (:class:`earlyexit.engine.SyntheticDepth`); ``exit_vocab``: the engine's pruned exit
    head."""
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.engine import LLMEngine

    max_len = max_len or max(len(p) + g for p, g in stream) + 1
    engine = LLMEngine(
        model,
        policy=policy,
        max_batch=max_batch,
        max_len=max_len,
        synthetic=synthetic,
        exit_vocab=exit_vocab,
        allow_untrained_exits=True,  # a benchmark measures what it is given; quality beside it
    )
    t = time.perf_counter()
    reqs = [
        engine.requests[
            engine.add_request(prompt, SamplingParams(max_new_tokens=glen, ignore_eos=True), exit)
        ]
        for prompt, glen in stream
    ]
    while engine.has_unfinished():
        engine.step()
    sync()
    dt = time.perf_counter() - t
    tokens = sum(len(r.output_ids) for r in reqs)
    depths = [d for r in reqs for d in r.depths]
    return {
        "seconds": dt,
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "mean_depth": float(np.mean(depths)),
        "depths": depths,
        "outputs": [list(r.output_ids) for r in reqs],
        "occupancy": engine.occupancy(),
    }
