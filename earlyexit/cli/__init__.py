"""``earlyexit <command>``: the command-line interface.

One module per command (``generate``, ``convert``, ``prepare``, ``train``, ``eval``, ``bench``,
``serve``, ``demo``), each owning its flags (``register``) and its handler (``run``), which
calls one typed function of the library (the same functions the Python API exposes). Flag
groups several commands share (device, precision, sampling, early-exit strategy) live in
``common.py``, flag choices that are library constants in ``choices.py``. To add a command:
a module with ``register(sub)`` and ``run(args) -> int``, listed in ``COMMANDS``.

Every error is one line, ``earlyexit: error: ...``, never a traceback for bad input. Its
exit status says which kind: 1 for input the command could not use (a missing model, an
invalid sampling value), 2 for a command line that does not parse (an unknown flag, an
invalid choice such as ``--strategy fast``, a missing argument), the Unix convention for
usage errors that argparse follows; the line names the ``--help`` to read.
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``earlyexit: error: generate: argument
    --strategy: invalid choice ... (see earlyexit generate --help)``, exit status 2, instead
    of the whole usage block. Subcommand parsers are of this class too (argparse makes
    them of their parent's class)."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f"{sub}: " if sub else ""
        self.exit(2, f"earlyexit: error: {where}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``earlyexit`` parser with every command of :data:`COMMANDS`."""
    p = _Parser(
        prog="earlyexit",
        description="Adaptive-depth LLM inference: FREE early exit, Relaxed Recursive Transformers, Mixture-of-Recursions.",
    )
    p.add_argument("--version", action="version", version=_version())
    # ``bench all`` runs each step as the command a user would type, through this main;
    # handed over here so that cli/bench.py need not import the package that imports it
    p.set_defaults(cli_main=main)
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
