"""Every `earlyexit` command in the README is a valid command line of this CLI.

The cheap commands also run for real elsewhere (test_cli, test_evaluation, the demo smoke
test); the training recipes run in the benchmark suite. This test pins the documentation to
the parser, so a renamed flag or subcommand fails here, not in a newcomer's shell.
"""

import re
import shlex
from pathlib import Path

import pytest

from earlyexit.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    cmds = []
    for block in blocks:
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, comments=True)
                if "earlyexit" in words:  # also `torchrun ... -m earlyexit train ...`
                    cmds.append(shlex.join(words[words.index("earlyexit") + 1 :]))
    return cmds


def test_the_readme_has_commands():
    cmds = readme_commands()
    assert len(cmds) > 30
    assert "demo" in cmds  # the main job


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command_parses(cmd):
    args = build_parser().parse_args(shlex.split(cmd))
    assert callable(args.func)
