"""The command line: the documented commands work, bad input is one line and a non-zero exit."""

import json
import subprocess
import sys

import pytest

from earlyexit.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json(capsys, tiny_lm_dir):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_lm_dir),
        "--json",
        "--max-new-tokens",
        "7",
        "--device",
        "cpu",
        "def main(",
    )
    assert code == 0, err
    res = json.loads(out)
    assert len(res["token_ids"]) == 7 and res["depths"] == [4] * 7
    assert isinstance(res["text"], str) and res["finish_reason"] == "length"
    assert res["prompt_tokens"] == len("def main(")


def test_generate_reads_stdin_and_streams(tiny_lm_dir):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "earlyexit",
            "generate",
            "--model",
            str(tiny_lm_dir),
            "--stream",
            "--max-new-tokens",
            "5",
        ],
        input="import os\n",
        capture_output=True,
        text=True,
        timeout=600,  # a backstop: start-up alone takes many seconds on a loaded machine
    )
    assert p.returncode == 0, p.stderr
    assert "5 tokens" in p.stderr and "mean depth 4.00/4" in p.stderr


def test_generate_from_token_ids(capsys, tiny_lm_dir):
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_lm_dir),
        "--ids",
        "--json",
        "--max-new-tokens",
        "3",
        "1,2,3",
    )
    assert code == 0 and json.loads(out)["prompt_tokens"] == 3


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--temperature", "-1"], "temperature must be"),
        (["--top-p", "0"], "top_p must be"),
        (["--max-new-tokens", "0"], "max_new_tokens must be"),
        (["--device", "cuda"], "CUDA was requested"),
        (["--device", "tpu"], "use cpu, cuda"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, tiny_lm_dir, args, msg):
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_lm_dir), *args, "hello")
    assert code == 1
    assert err.startswith("earlyexit: error:") and msg in err and err.count("\n") == 1


def test_bad_prompts_and_models(capsys, tmp_path, tiny_lm_dir):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "x")
    assert code == 1 and "no such directory" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_lm_dir), "   ")
    assert code == 1 and "empty" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_lm_dir), "x" * 300)
    assert code == 1 and "context is 256" in err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run_cli(
        capsys, "convert", "hf-import", str(tmp_path / "hf"), str(tmp_path / "o")
    )
    assert code == 1 and "unsupported architecture model_type='bert'" in err and "llama" in err


def test_convert_round_trip_and_refuses_to_overwrite(capsys, tmp_path, tiny_lm_dir):
    pytest.importorskip("transformers")
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert run_cli(capsys, "convert", "hf-export", str(tiny_lm_dir), str(hf_dir))[0] == 0
    assert (hf_dir / "config.json").is_file() and (hf_dir / "tokenizer.json").is_file()
    assert run_cli(capsys, "convert", "hf-import", str(hf_dir), str(back), "--json")[0] == 0
    code, _, err = run_cli(capsys, "convert", "hf-import", str(hf_dir), str(back))
    assert code == 1 and "--force" in err
    assert run_cli(capsys, "convert", "hf-import", str(hf_dir), str(back), "--force")[0] == 0
    # the Hugging Face directory itself can be generated from directly
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(hf_dir),
        "--json",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "ab",
    )
    assert code == 0
    code, out2, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(back),
        "--json",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "ab",
    )
    assert json.loads(out)["token_ids"] == json.loads(out2)["token_ids"]


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    assert e.value.code == 2


@pytest.mark.parametrize("strategy", ["full", "static", "calm", "free", "speculative"])
def test_generate_with_each_strategy(capsys, exit_lm_dir, strategy):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(exit_lm_dir),
        "--strategy",
        strategy,
        "--threshold",
        "0.05",
        "--json",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "def f(",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["strategy"] == strategy and len(res["depths"]) == 12
    assert all(1 <= d <= 4 for d in res["depths"]) and 0 <= res["exit_rate"] <= 1
    assert isinstance(res["strategy_stats"], dict)


def test_show_depth_colours_tokens_and_summarises(capsys, exit_lm_dir):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(exit_lm_dir),
        "--strategy",
        "free",
        "--threshold",
        "-1",
        "--show-depth",
        "--color",
        "always",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "def f(",
    )
    assert code == 0
    assert "\x1b[38;5;" in out and "depth:" in err and out.endswith("\n")
    assert "mean depth 2.33/4" in err and "exit rate 83%" in err  # 1 prefill token + 5 exits


def test_show_depth_into_a_pipe_writes_no_colour_codes(capsys, exit_lm_dir):
    """stdout is not a terminal here (captured): --color auto writes plain text and lists
    the depths on stderr instead."""
    argv = ["generate", "--model", str(exit_lm_dir), "--strategy", "free", "--threshold", "-1"]
    argv += ["--show-depth", "--max-new-tokens", "6", "--device", "cpu", "def f("]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "\x1b" not in out + err and out.endswith("\n")
    assert "depths: 4 2 2 2 2 2" in err  # the prefill token, then exits after step 2


def test_help_and_version_do_not_import_torch():
    """`earlyexit --help` must answer at once: the package imports torch lazily."""
    code = (
        "import sys, contextlib, io\n"
        "from earlyexit.cli import main\n"
        "for argv in (['--version'], ['--help'], ['serve', '--help'], ['demo', '--help'],\n"
        "             ['train', '--help'], ['bench', 'depthwise', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print('torch' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_exit_strategy_errors_and_warnings(capsys, exit_lm_dir, tiny_lm_dir):
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(exit_lm_dir),
        "--strategy",
        "free",
        "--exit-step",
        "9",
        "x",
    )
    assert code == 1 and "outside the model's depth" in err
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(exit_lm_dir),
        "--strategy",
        "free",
        "--threshold",
        "2",
        "x",
    )
    assert code == 1 and "threshold must be a number in [-1, 1]" in err
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(exit_lm_dir),
        "--strategy",
        "speculative",
        "--temperature",
        "0.5",
        "x",
    )
    assert code == 1 and "greedy-only" in err
    static2 = ["generate", "--model", str(tiny_lm_dir), "--strategy", "static", "--exit-step", "2"]
    code, _, err = run_cli(capsys, *static2, "--max-new-tokens", "2", "x")
    # refused, with the way forward: train an exit, speculate, or allow it explicitly
    assert code == 1 and "not an exit point" in err and "--allow-untrained-exits" in err
    assert "earlyexit train" in err and err.count("\n") == 1
    code, _, err = run_cli(
        capsys, *static2, "--allow-untrained-exits", "--max-new-tokens", "2", "x"
    )
    assert code == 0 and "earlyexit: warning: step 2 is not an exit point" in err
    assert "poor tokens" in err


def test_generate_with_a_pruned_exit_head(capsys, exit_setup):
    """--exit-vocab N --vocab-data DIR: the exit decides over the corpus's N most frequent
    tokens; every token emitted at the exit is one of them (counted here from the corpus
    as the reference). Without --vocab-data: one error line."""
    import numpy as np

    from earlyexit.training.data import token_file

    model, data = str(exit_setup / "model"), str(exit_setup / "data")
    counts = np.bincount(token_file(data, "train"), minlength=300)
    top = set(np.argsort(-counts, kind="stable")[:20].tolist())
    base = ["generate", "--model", model, "--strategy", "free", "--threshold", "-1"]
    args = [*base, "--exit-vocab", "20", "--vocab-data", data, "--json", "--ids"]
    code, out, err = run_cli(capsys, *args, "--max-new-tokens", "8", "5,6,7")
    assert code == 0, err
    res = json.loads(out)
    assert res["strategy_stats"]["exit_vocab"] == 20
    exited = [t for t, d in zip(res["token_ids"], res["depths"]) if d == 1]
    assert exited and set(exited) <= top
    code, _, err = run_cli(capsys, *base, "--exit-vocab", "20", "x")
    assert code == 1 and "--vocab-data" in err and err.count("\n") == 1
