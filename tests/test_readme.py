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


def test_the_install_gets_the_cpu_torch_pinned_like_ci():
    """The README's install names PyTorch's CPU index (an unpinned PyPI torch is a CUDA
    build) and pins the torch version `.ci/run` installs."""
    text = README.read_text()
    first = re.findall(r"```bash\n(.*?)```", text, flags=re.S)[0]
    assert "pip install torch==" in first
    assert "--index-url https://download.pytorch.org/whl/cpu" in first
    ci = (README.parent / ".ci" / "run").read_text()
    (pin,) = set(re.findall(r"torch==([0-9.]+)", ci))
    assert f"torch=={pin} " in first


def test_every_claim_on_the_first_screen_names_its_cpu():
    """'What you can reproduce': one line per claim, each with the CPU it was measured on."""
    text = README.read_text()
    section = text.split("## What you can reproduce", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "---" not in r][1:]
    assert len(rows) >= 8
    for row in rows:
        cpu = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert any(w in cpu for w in ("EPYC", "Sapphire Rapids", "any")), row
        assert len(row) < 260, row  # a short line, not an analysis


def test_the_readme_states_the_exit_statuses_the_cli_gives():
    text = " ".join(README.read_text().split())
    assert "exits with status 1" in text and "exits with status 2" in text
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["generate", "--model", "m", "--strategy", "fast", "x"])
    assert e.value.code == 2
