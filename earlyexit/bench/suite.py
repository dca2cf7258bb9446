"""``earlyexit bench all``: the whole benchmark suite of BENCHMARKS.md, in one command.

Trains whatever recipe a benchmark needs and is missing (each resumes if interrupted),
then runs every benchmark in order, each writing its JSON rows under ``results/``, then
draws the figures. ``--dry-run`` prints the commands instead; ``--skip a,b`` leaves some out.
On 2 CPU cores the full suite takes a few hours (training most of it); every step is the
same command a user would type, so one can be rerun alone.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from earlyexit.errors import EarlyExitError

# (name, argv after `earlyexit`, the run it produces or None); in dependency order
TRAINING = [
    (
        "data",
        ["prepare", "--corpus", "stdlib", "--out", "data/stdlib"],
        "data/stdlib/manifest.json",
    ),
    ("stdlib-small", ["train", "--preset", "stdlib-small", "--resume"], "runs/stdlib-small/final"),
    (
        "stdlib-small-free",
        ["train", "--preset", "stdlib-small-free", "--resume"],
        "runs/stdlib-small-free/final",
    ),
    (
        "stdlib-small-calm",
        ["train", "--preset", "stdlib-small-calm", "--resume"],
        "runs/stdlib-small-calm/final",
    ),
    (
        "stdlib-small-free-cls",
        ["train", "--preset", "stdlib-small-free-cls", "--resume"],
        "runs/stdlib-small-free-cls/final",
    ),
    (
        "stdlib-small-rec-init",
        [
            "convert",
            "recursive",
            "runs/stdlib-small/final",
            "runs/stdlib-small-rec-init",
            "--loops",
            "2",
            "--force",
        ],
        "runs/stdlib-small-rec-init",
    ),
    (
        "stdlib-small-rec",
        ["train", "--preset", "stdlib-small-rec", "--resume"],
        "runs/stdlib-small-rec/final",
    ),
    (
        "stdlib-small-rec-exit",
        ["train", "--preset", "stdlib-small-rec-exit", "--resume"],
        "runs/stdlib-small-rec-exit/final",
    ),
]

BENCHMARKS = [
    ("decode", ["bench", "decode"]),
    (
        "early-exit",
        [
            "bench",
            "early-exit",
            "--model",
            "runs/stdlib-small-free-cls/final",
            "--calm-model",
            "runs/stdlib-small-calm/final",
        ],
    ),
    ("batched-exit", ["bench", "batched-exit", "--model", "runs/stdlib-small-free/final"]),
    ("conversion", ["bench", "conversion"]),
    ("mor-isoflop", ["bench", "mor-isoflop"]),  # trains the MoR and recursive baselines itself
    (
        "depthwise",
        [
            "bench",
            "depthwise",
            "--dense",
            "runs/stdlib-small/final",
            "--recursive",
            "runs/stdlib-small-rec-exit/final",
            "--exit-model",
            "runs/stdlib-small-free/final",
            "--mor",
            "runs/stdlib-small-mor/final",
            "--threshold",
            "0.3",
        ],
    ),
    (
        "serve",
        ["bench", "serve", "--model", "runs/stdlib-small-rec-exit/final", "--threshold", "0.3"],
    ),
    ("plot", ["bench", "plot"]),
]


def plan(skip: set[str]) -> list[tuple[str, list[str]]]:
    """(name, argv) of every step still to run: training whose output is missing, then
    every benchmark not skipped."""
    unknown = skip - {n for n, *_ in TRAINING} - {n for n, _ in BENCHMARKS}
    if unknown:
        names = [n for n, _ in BENCHMARKS]
        raise EarlyExitError(
            f"--skip: unknown step(s) {sorted(unknown)}; benchmarks: {', '.join(names)}"
        )
    steps = [
        (n, argv) for n, argv, product in TRAINING if n not in skip and not Path(product).exists()
    ]
    return steps + [(n, argv) for n, argv in BENCHMARKS if n not in skip]


def _with_device(argv: list[str], device: list[str], precision: str = "auto") -> list[str]:
    """Benchmarks take ``--device`` and ``--dtype``; training takes ``--device`` and the
    training ``--precision`` (as do the benchmarks that train); preparing and converting
    take neither."""
    prec = ["--precision", precision] if precision != "auto" else []
    if argv[0] == "bench" and argv[1] != "plot":
        return argv + device + (prec if argv[1] in ("conversion", "mor-isoflop") else [])
    if argv[0] == "train":
        return argv + (device[:2] if device[:1] == ["--device"] else []) + prec
    return argv


def run_all(
    command: Callable[[list[str]], int],
    skip: set[str] | None = None,
    dry_run: bool = False,
    device: list[str] | None = None,
    log=print,
    precision: str = "auto",
) -> int:
    """Run the suite; returns the number of failed steps (each failure is reported and the
    suite goes on with the steps that do not depend on it). ``command`` runs one step's
    ``earlyexit`` argv and returns its exit status (the CLI passes its ``main``: the suite
    does not import the CLI, which imports the suite). ``device``: flags appended to every
    training and benchmark step (``--device cuda --dtype bfloat16``)."""
    steps = [(n, _with_device(argv, device or [], precision)) for n, argv in plan(skip or set())]
    failed = []
    for name, argv in steps:
        cmd = "earlyexit " + shlex.join(argv)
        if dry_run:
            print(cmd)
            continue
        log(f"=== {name}: {cmd}")
        t = time.perf_counter()
        rc = command(argv)
        log(
            f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t:.0f}s"
        )
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"earlyexit: bench all: failed steps: {', '.join(failed)}", file=sys.stderr)
    return len(failed)
