"""Mutation testing of one module: which plausible bugs do its tests let through?

    pip install -e '.[mutation]'
    python scripts/mutation.py earlyexit/decoding/free.py            # its mapped test files
    python scripts/mutation.py earlyexit/models/mor.py --tests tests/test_mor.py

mutmut (configured in pyproject.toml ``[tool.mutmut]`` for decoding, models, engine and the
training losses) mutates every function of the module one small change at a time (an
operator, a constant, a comparison, a dropped argument) and runs the tests that reach that
function; a mutant no test fails on *survived*. This script narrows a run to one module
and the test files that cover it (``TESTS`` below, or ``--tests``), in a scratch copy of
the working tree (``.mutation/<module>/``), so the repository is never modified. It prints
mutmut's per-mutant results and the counts, and writes them to
``.mutation/<module>/summary.json``. ``mutmut show NAME`` inside that directory prints a
survivor's diff. ``--recheck`` reruns only the previous run's survivors against the current
tests (after adding tests; the module itself must be unchanged, or mutant names shift).
Not part of CI's default run: a module takes minutes to an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The test files that exercise each module (the mutants of a module run only these).
TESTS = {
    "earlyexit/decoding/free.py": ["tests/test_exits.py"],
    "earlyexit/decoding/calm.py": ["tests/test_exits.py"],
    "earlyexit/decoding/threshold.py": ["tests/test_exits.py"],
    "earlyexit/decoding/confidence.py": ["tests/test_exits.py"],
    "earlyexit/decoding/speculative.py": ["tests/test_exits.py"],
    "earlyexit/decoding/full.py": ["tests/test_exits.py", "tests/test_generate.py"],
    "earlyexit/decoding/base.py": ["tests/test_exits.py", "tests/test_generate.py"],
    "earlyexit/decoding/strategies.py": ["tests/test_exits.py", "tests/test_mor.py"],
    "earlyexit/decoding/sampling.py": ["tests/test_sampling.py", "tests/test_generate.py"],
    "earlyexit/decoding/generate.py": ["tests/test_generate.py", "tests/test_exits.py"],
    "earlyexit/decoding/mor.py": ["tests/test_mor.py"],
    "earlyexit/models/kv_cache.py": [
        "tests/test_decoder.py",
        "tests/test_exits.py",
        "tests/test_mor.py",
        "tests/test_recursive.py",
    ],
    "earlyexit/plan.py": ["tests/test_config.py", "tests/test_recursive.py"],
    "earlyexit/models/mor.py": ["tests/test_mor.py"],
    "earlyexit/models/routers.py": ["tests/test_mor.py"],
    "earlyexit/models/lora.py": ["tests/test_recursive.py"],
    "earlyexit/models/recursive.py": ["tests/test_recursive.py"],
    "earlyexit/models/layers.py": ["tests/test_decoder.py", "tests/test_hf.py"],
    "earlyexit/models/decoder.py": ["tests/test_decoder.py", "tests/test_exits.py"],
    "earlyexit/engine/scheduler.py": ["tests/test_engine.py"],
    "earlyexit/engine/runner.py": ["tests/test_engine.py"],
    "earlyexit/engine/engine.py": ["tests/test_engine.py"],
    "earlyexit/training/losses.py": ["tests/test_exit_training.py", "tests/test_mor.py"],
    "earlyexit/training/exit_losses.py": ["tests/test_exit_training.py"],
    "earlyexit/training/objective.py": ["tests/test_exit_training.py", "tests/test_mor.py"],
}


def scratch_copy(dest: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, copied to ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def narrow_config(pyproject: Path, module: str, tests: list[str]) -> None:
    """Point ``[tool.mutmut]`` of the copy at one module and its test files."""
    text = pyproject.read_text()
    text = re.sub(r"only_mutate = \[[^\]]*\]", f"only_mutate = {json.dumps([module])}", text)
    text = re.sub(
        r"pytest_add_cli_args_test_selection = \[[^\]]*\]",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        text,
    )
    pyproject.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "module",
        help="a .py file under earlyexit/, e.g. earlyexit/decoding/free.py; 'table': print "
        "the counts of every module run so far",
    )
    ap.add_argument("--tests", nargs="+", help="test files to run (default: the module's own)")
    ap.add_argument("--max-children", type=int, default=2, help="mutants run in parallel")
    ap.add_argument(
        "--recheck",
        action="store_true",
        help="rerun only the previous run's non-killed mutants against the current tests",
    )
    args = ap.parse_args()
    if args.module == "table":
        return print_table()
    module = args.module
    if not (ROOT / module).is_file():
        print(f"error: no such module {module}", file=sys.stderr)
        return 2
    tests = args.tests or TESTS.get(module)
    if not tests:
        print(f"error: no test files mapped for {module}; pass --tests", file=sys.stderr)
        return 2
    work = ROOT / ".mutation" / module.replace("/", ".").removesuffix(".py")
    names: list[str] = []
    if args.recheck:
        previous = json.loads((work / "summary.json").read_text())["mutants"]
        names = [n for n, status in previous.items() if status != "killed"]
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)  # new tests: remap
    elif work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    scratch_copy(work)
    narrow_config(work / "pyproject.toml", module, tests)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"  # mutants run in parallel processes: one thread each
    run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    if args.recheck and not names:
        print("nothing to recheck: every mutant was killed")
    else:
        subprocess.run(run + names, cwd=work, env=env, check=False)
    res = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    statuses: dict[str, str] = {}
    for line in res.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            statuses[name] = status
    counts = collections.Counter(statuses.values())
    summary = {"module": module, "tests": tests, "counts": dict(counts), "mutants": statuses}
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, status in sorted(statuses.items()):
        if status != "killed":
            print(f"{status:>10}  {name}")
    print(json.dumps({"module": module, "counts": dict(counts)}))
    return 0


def print_table() -> int:
    """The counts of every module run so far (``python scripts/mutation.py table``)."""
    print("| module | mutants | killed | survived | no test reaches it | timeout |")
    print("|---|---|---|---|---|---|")
    for f in sorted((ROOT / ".mutation").glob("*/summary.json")):
        d = json.loads(f.read_text())
        c = collections.Counter(d["mutants"].values())
        cells = [sum(c.values()), c["killed"], c["survived"], c["no tests"], c["timeout"]]
        print(f"| `{d['module']}` | " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
