"""``earlyexit bench depthwise --calls``: what one shared-block call costs with rows at mixed depths.

Depth-wise batching runs one shared block on rows at different loops of it; each row reads
and writes its own KV slot. This micro-benchmark times exactly that call against the call
it must not be slower than: the same R rows at one slot (a plain batched decode step).

For a recursive model of a preset's shape (random weights, cycle sharing, 2 loops) and
each R in ``rows`` and context length in ``lengths``: R rows hold ``length`` cached
entries in both loops' slots of block 0; one decode token per row runs through block 0

- *plain*: every row at loop 1 (slot 0), rows 0..R-1, as the engine runs it (through the
  compiled decode kernel where it applies: ``models/decode_kernel.py``);
- *mixed*: the same rows, alternately at loop 1 and loop 2 (slots 0 and K): the depth-wise
  case, through ``Decoder.run_block`` with per-row KV slots, on the attention path the
  engine picks (``KVCache.attention = "auto"``: the kernel where it applies);
- *plain without the kernel*: the plain call on PyTorch's SDPA (the plain call before the
  kernel existed);
- *per-slot* / *per-row*: the mixed call forced onto either PyTorch path (attention once
  per KV slot over views of it for all rows / once per row over a view of its history);
- *mixed, gathered*: the same call with each row's keys and values gathered out of its own
  slot into one batch first (the first design, kept as the ablation).

Each call appends one entry per row and the lengths are set back, so every call sees the
same cache. Calls alternate between the variants, ``repeats`` of each; the median is reported.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from earlyexit.bench.common import environment, set_threads, sync, write_rows
from earlyexit.config import ModelConfig
from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache


def _model(preset: str, device: str) -> Decoder:
    cfg = ModelConfig.from_name(preset, sharing={"scheme": "cycle", "loops": 2})
    with torch.device(device):
        model = Decoder(cfg)
    model.init_weights(torch.Generator(device=device).manual_seed(0))
    return model.eval()


def time_calls(
    model: Decoder, rows: int, length: int, repeats: int = 20, device: str = "cpu"
) -> dict:
    """Median seconds of one block call, plain and mixed, with ``rows`` rows at ``length``."""
    K = model.config.n_blocks
    cache = KVCache.for_model(model, rows, length + 2)
    g = torch.Generator(device=device).manual_seed(0)
    for slot in (0, K):  # fill both loops' slots of block 0 with random entries
        cache.k_all[slot].normal_(generator=g)
        cache.v_all[slot].normal_(generator=g)
    cache.lengths[:, :] = length
    r = np.arange(rows)
    h = torch.randn(rows, 1, model.config.d_model, generator=g, device=device)
    pos = torch.full((rows, 1), length, device=device)
    mixed_slots = np.where(r % 2 == 0, 0, K)
    lora = None

    def plain(kernel: bool = True) -> None:
        cache.attention = "auto" if kernel else "sdpa"
        ctx = model.context(pos, cache, rows=r)
        model.run_step(0, h, ctx)
        cache.lengths[0, r] -= 1

    def mixed(mode: str = "auto") -> None:
        cache.attention = mode
        ctx = model.context(pos, cache, rows=r, kv_slots=mixed_slots)
        model.run_block(0, h, ctx, -1, lora)
        cache.lengths[mixed_slots, r] -= 1

    variants = {
        "plain": plain,
        "mixed": mixed,
        "plain_sdpa": lambda: plain(False),
        "per_slot": lambda: mixed("per-slot"),
        "per_row": lambda: mixed("per-row"),
        "gathered": lambda: mixed("gather"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for f in [*variants.values(), *variants.values()]:  # warm-up
            f()
        for i in range(repeats):
            order = list(variants.items())
            for name, f in order if i % 2 == 0 else order[::-1]:
                sync()
                t = time.perf_counter()
                f()
                sync()
                times[name].append(time.perf_counter() - t)
        cache.attention = "auto"
        mode = model.context(pos, cache, rows=r, kv_slots=mixed_slots).backend
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        **{f"{k}_s": t for k, t in med.items()},
        **{f"{k}_over_plain": t / med["plain"] for k, t in med.items() if k != "plain"},
        "mode": mode,
        "samples": times,
    }


def run(
    preset: str = "smollm-135m",
    rows: tuple[int, ...] = (4, 16, 32),
    lengths: tuple[int, ...] = (128, 512, 2048),
    repeats: int = 20,
    threads: int | None = None,
    device: str = "cpu",
    out: str | None = "results/depthwise_calls.json",
) -> list[dict]:
    threads = set_threads(threads)
    env = environment(threads)
    model = _model(preset, device)
    out_rows = []
    for length in lengths:
        for R in rows:
            res = time_calls(model, R, length, repeats, device)
            out_rows.append(
                {
                    "bench": "depthwise-calls",
                    "preset": preset,
                    "rows": R,
                    "length": length,
                    **res,
                    "env": env,
                }
            )
            print(
                f"  rows {R:3d}  length {length:5d}  plain {res['plain_s'] * 1e3:7.2f} ms  "
                f"mixed {res['mixed_s'] * 1e3:7.2f} ms ({res['mixed_over_plain']:.2f}x, "
                f"{res['mode']})  plain without the kernel {res['plain_sdpa_over_plain']:.2f}x  "
                f"per-slot {res['per_slot_over_plain']:.2f}x  "
                f"per-row {res['per_row_over_plain']:.2f}x  "
                f"gathered {res['gathered_over_plain']:.2f}x",
                flush=True,
            )
    write_rows(out_rows, out)
    return out_rows
