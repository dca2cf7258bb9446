"""``earlyexit prepare``: tokenize a corpus for training."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    """Add ``earlyexit prepare`` and its flags to the subcommand parsers ``sub``."""
    pr = sub.add_parser(
        "prepare", help="tokenize a corpus for training (default: the Python standard library)"
    )
    pr.add_argument(
        "--corpus",
        nargs="+",
        default=["stdlib"],
        help="stdlib, files, folders, globs, or hf:NAME (several allowed)",
    )
    pr.add_argument("--out", default="data/stdlib", help="output directory")
    pr.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="BPE vocabulary to train (special token included)",
    )
    pr.add_argument(
        "--tokenizer", default=None, help="use this tokenizer.json instead of training one"
    )
    pr.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="share of documents held out for validation",
    )
    pr.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    pr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from earlyexit.training.corpus import prepare

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    m = prepare(args.corpus, args.out, args.vocab_size, args.tokenizer, args.val_fraction, say)
    if args.json:
        print(
            json.dumps(
                {k: m[k] for k in ("counts", "tokenizer", "dtype", "eot_id")} | {"out": args.out}
            )
        )
    return 0
