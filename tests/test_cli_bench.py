"""`earlyexit bench NAME`: one subcommand per benchmark, each with only its own flags; every
`earlyexit bench` command line the documentation shows still parses."""

import ast
import inspect
import re
import shlex
import textwrap
from pathlib import Path

import pytest

from earlyexit.cli import bench as cli_bench
from earlyexit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("BENCHMARKS.md", "README.md", *(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))


def documented_bench_commands() -> list[tuple[str, str]]:
    """(file, argv after `earlyexit`) of every `earlyexit bench ...` in code blocks and inline
    code of the documents (continued lines joined, comments and `&&` split off)."""
    found = []
    for name in DOCS:
        text = (ROOT / name).read_text()
        pieces = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        outside = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
        pieces += [m.replace("\n", " ") for m in re.findall(r"`([^`]+)`", outside)]
        for piece in pieces:
            for line in piece.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    if "earlyexit bench" not in part:
                        continue
                    words = shlex.split(part.split("  #")[0], comments=True)
                    if words[:2] == ["earlyexit", "bench"] and len(words) > 2:
                        found.append((name, shlex.join(words[1:])))
    return found


def test_the_documents_show_bench_commands():
    cmds = documented_bench_commands()
    assert len(cmds) > 30
    assert {c.split()[1] for _, c in cmds} >= {"decode", "depthwise", "batched-exit", "all"}


@pytest.mark.parametrize("doc,cmd", documented_bench_commands())
def test_documented_bench_command_parses(doc, cmd):
    args = build_parser().parse_args(shlex.split(cmd))
    assert args.func is cli_bench.BENCHMARKS[args.name][2]


def _subparser(name: str):
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    return bench._subparsers._group_actions[0].choices[name]


def _flags(name: str) -> set[str]:
    return {o for a in _subparser(name)._actions for o in a.option_strings}


def test_each_benchmark_takes_only_its_own_flags():
    assert "--calm-model" in _flags("early-exit") and "--calm-model" not in _flags("depthwise")
    assert {"--synthetic", "--calls", "--presets", "--lengths"} <= _flags("depthwise")
    assert "--synthetic" not in _flags("decode") and "--compile" not in _flags("depthwise")
    assert _flags("plot") == {"-h", "--help", "--results", "--plots"}
    # only the benchmarks that train take the training precision
    assert [n for n in cli_bench.BENCHMARKS if "--precision" in _flags(n)] == [
        "conversion",
        "mor-isoflop",
        "all",
    ]


@pytest.mark.parametrize("name", list(cli_bench.BENCHMARKS))
def test_every_flag_a_handler_reads_is_declared(name):
    """A handler reads args.X only for an X its own subparser declares (a flag left out
    would be an AttributeError at run time, after the parse)."""
    _, _, handler = cli_bench.BENCHMARKS[name]
    source = textwrap.dedent(inspect.getsource(handler))
    read = {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "args"
    }
    argv = ["bench", name] + (["--model", "m"] if name in ("early-exit", "batched-exit") else [])
    args = build_parser().parse_args(argv)
    assert read <= set(vars(args)), read - set(vars(args))


def test_defaults_are_declared_at_the_flag():
    args = build_parser().parse_args(["bench", "batched-exit", "--model", "m"])
    assert (args.prompts, args.prompt_len, args.new_tokens, args.repeats) == (32, 32, 64, 2)
    assert args.batch_sizes == [1, 8, 16, 32] and args.out == "results/batched_exit.json"
    args = build_parser().parse_args(["bench", "decode"])
    assert (args.preset, args.batch_sizes, args.new_tokens, args.repeats) == (
        "smollm-135m",
        [1, 8],
        128,
        3,
    )


def test_the_suite_steps_parse():
    """Every step of `bench all`, with the device and precision flags it appends."""
    from earlyexit.bench.suite import BENCHMARKS, TRAINING, _with_device

    device = ["--device", "cpu", "--dtype", "bfloat16"]
    for _, argv, *_ in TRAINING + BENCHMARKS:
        build_parser().parse_args(_with_device(argv, device, "bfloat16"))
