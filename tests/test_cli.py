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
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "5 tokens" in p.stderr and "mean depth 4.0/4" in p.stderr


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


def test_demo_quick(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "earlyexit", "demo", "--quick", "--json", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    if "skipped" not in res["parity"]:
        assert res["parity"]["greedy_tokens_identical"] and res["parity"]["max_logit_diff"] < 1e-4
    assert len(res["result"]["token_ids"]) == 16
