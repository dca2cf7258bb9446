"""``earlyexit <command>``: the command-line interface.

One module per command (``generate``, ``convert``, ``prepare``, ``train``, ``eval``, ``bench``,
``serve``, ``demo``), each owning its flags (``register``) and its handler (``run``), which
calls one typed function of the library (the same functions the Python API exposes). Flag
groups several commands share (device, precision, sampling, early-exit strategy) live in
``common.py``. To add a command: a module with ``register(sub)`` and ``run(args) -> int``,
listed in ``COMMANDS``.

User errors print one line (``earlyexit: error: ...``) and exit with status 1; usage errors
exit with 2 (argparse); never a traceback for bad input.
"""

from __future__ import annotations

import argparse
import sys

from earlyexit.cli import bench, convert, demo, draft, generate, prepare, serve, train
from earlyexit.cli import eval as eval_
from earlyexit.cli.train import train_config_from_args
from earlyexit.errors import EarlyExitError

__all__ = ["COMMANDS", "build_parser", "main", "train_config_from_args"]

# In the order ``earlyexit --help`` lists them.
COMMANDS = (generate, convert, prepare, train, draft, eval_, bench, serve, demo)


def _version() -> str:
    from earlyexit import __version__

    return f"earlyexit {__version__}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="earlyexit",
        description="Adaptive-depth LLM inference: FREE early exit, Relaxed Recursive Transformers, Mixture-of-Recursions.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EarlyExitError as e:
        print(f"earlyexit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("earlyexit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
