"""``earlyexit demo``: what earlyexit does, end to end, no downloads."""

from __future__ import annotations

import argparse

from earlyexit.cli.common import (
    add_device_flags,
    add_precision_flag,
)


def register(sub) -> None:
    """Add ``earlyexit demo`` and its flags to the subcommand parsers ``sub``."""
    d = sub.add_parser("demo", help="the main job: what earlyexit does, end to end, no downloads")
    d.add_argument("--out", default=None, help="work directory (default: ~/.cache/earlyexit/demo)")
    d.add_argument("--quick", action="store_true", help="a seconds-long version (CI smoke test)")
    d.add_argument(
        "--model",
        default=None,
        metavar="MODEL",
        help="measure a pretrained model instead of the demo's own (a directory, a named model "
        "such as smollm2, or a hub name when online): an exit is first fine-tuned on its "
        "frozen body (unless it has trained exits), then every strategy and batching policy "
        "is measured on it",
    )
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    add_precision_flag(d, "compute of the demo's trainings")
    add_device_flags(d, dtype=None)  # the demo's figures stay comparable across CPUs
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from earlyexit.demo import main as demo_main

    return demo_main(
        out_dir=args.out,
        quick=args.quick,
        as_json=args.json,
        model=args.model,
        threads=args.threads,
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
    )
