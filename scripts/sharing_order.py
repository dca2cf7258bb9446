"""Does weight sharing save memory traffic on a CPU? It depends on the order of the loops.

    python scripts/sharing_order.py [--preset smollm-135m] [--batch-sizes 1 8] [--repeats 3]

A systems measurement (random weights, full depth, greedy, no exits): decode throughput of
one model shape as vanilla (every layer its own weights) and as 2 loops of half as many
shared blocks, in the two orders of the recursive-transformer paper: ``cycle`` (blocks
0..K-1, then 0..K-1 again: a block's second use comes K blocks later) and ``sequence``
(each block twice in a row: 0, 0, 1, 1, ...). Each with and without per-step LoRA (the
relaxation). Same depth, same FLOPs per token (plus LoRA's); what differs is whether a
block's weights are still in the CPU's last-level cache when they are used again. Runs are
interleaved (the order alternates each repetition); medians; ratios to vanilla in the same
run. Rows: results/sharing_order.json (BENCHMARKS.md, "real model").
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from earlyexit.bench.common import environment, set_threads, write_rows
from earlyexit.config import ModelConfig
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import make_strategy
from earlyexit.evaluation.metrics import timed_decode
from earlyexit.models.decoder import Decoder


def models(preset: str, ranks: tuple[int, ...]) -> dict:
    base = ModelConfig.from_name(preset)
    L = 2 * (base.n_layers // 2)
    cfgs = {"vanilla": ModelConfig.from_name(preset, n_layers=L)}
    for scheme in ("cycle", "sequence"):
        for r in ranks:
            extra = {"lora": {"rank": r}} if r else {}
            cfgs[f"{scheme} x2" + (f", LoRA {r}" if r else "")] = ModelConfig.from_name(
                preset, n_layers=L, sharing={"scheme": scheme, "loops": 2}, **extra
            )
    out = {}
    for name, cfg in cfgs.items():
        m = Decoder(cfg)
        m.init_weights(torch.Generator().manual_seed(0))
        out[name] = m.eval()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm-135m")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/sharing_order.json")
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    env = environment(threads)
    ms = models(args.preset, tuple(args.ranks))
    vocab = next(iter(ms.values())).config.vocab_size
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    for b in args.batch_sizes:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(0, vocab, (b, 16), generator=g).tolist()
        for m in ms.values():  # warm-up
            timed_decode(
                m,
                prompts,
                SamplingParams(max_new_tokens=2, ignore_eos=True),
                make_strategy(m, "full"),
                b,
            )
        times = {k: [] for k in ms}
        for r in range(args.repeats):
            for k in list(ms) if r % 2 == 0 else list(ms)[::-1]:
                dt, _ = timed_decode(ms[k], prompts, params, make_strategy(ms[k], "full"), b)
                times[k].append(dt)
        base = statistics.median(times["vanilla"])
        for k, m in ms.items():
            dt = statistics.median(times[k])
            row = {
                "bench": "sharing-order",
                "preset": args.preset,
                "model": k,
                "batch_size": b,
                "tokens_per_s": b * args.new_tokens / dt,
                "x_vanilla": base / dt,
                "seconds_all": times[k],
                "weight_mb": sum(p.numel() for p in m.parameters()) * 4 / 2**20,
                "env": env,
            }
            rows.append(row)
            print(
                f"batch {b:2d}  {k:24s} {row['tokens_per_s']:7.1f} tok/s  {row['x_vanilla']:.2f}x",
                flush=True,
            )
        write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
