"""What a new user hits first (issue 33 item 4): mistakes answered with the way forward, and
help texts that say what the command does."""

import shlex

import pytest

from earlyexit.cli import build_parser, main


def _err(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_a_near_miss_of_a_named_model_is_suggested(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./smollm here
    code, err = _err(capsys, "generate", "--model", "smollm", "hello")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("earlyexit: error: smollm: no such directory")
    assert "did you mean smollm2?" in err
    # a path is a path: no guessing at names
    code, err = _err(capsys, "generate", "--model", str(tmp_path / "smollm"), "hello")
    assert code == 1 and "no such directory" in err and "did you mean" not in err


def test_demo_refuses_a_bad_model_before_writing_anything(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for model, words in (("./nope", "not a model directory"), ("smollm", "did you mean smollm2")):
        code, err = _err(capsys, "demo", "--quick", "--model", model)
        assert code == 1 and words in err, err
        code, err = _err(capsys, "demo", "--quick", "--model", model, "--out", "w")
        assert code == 1 and words in err, err
    assert not any(tmp_path.iterdir())


def test_usage_mistakes_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "m", "--strategy", "fast", "hello"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # no usage block
    assert err.startswith("earlyexit: error: generate: argument --strategy: invalid choice: 'fast'")
    assert "see `earlyexit generate --help`" in err
    with pytest.raises(SystemExit) as e:
        main(["nonsense"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("earlyexit: error: argument COMMAND")


def _help(command: str) -> str:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return " ".join(sub.choices[command].format_help().split())


def test_demo_help_says_what_model_does():
    text = _help("demo")
    assert "named model such as smollm2" in text
    assert "fine-tuned on its frozen body" in text and "instead of training" not in text


def test_eval_model_help_names_named_models():
    assert "named model (smollm2)" in _help("eval")


def test_perplexity_on_data_of_another_tokenizer_suggests_the_prepare_command(
    capsys, tiny_lm_dir, exit_setup
):
    """The data was tokenized with exit_setup's trained 300-token BPE; tiny_lm_dir has a
    byte-level tokenizer: the error names the command that tokenizes the same corpus with
    the model's own tokenizer, into a new folder (the old data is kept)."""
    data = exit_setup / "data"
    code, err = _err(capsys, "eval", "perplexity", "--model", str(tiny_lm_dir), "--data", str(data))
    assert code == 1 and err.count("\n") == 1
    out = f"{data}-tiny"
    want = (
        f"`earlyexit prepare --corpus {exit_setup / 'src'} --tokenizer "
        f"{tiny_lm_dir / 'tokenizer.json'} --out {out}`, then pass --data {out}"
    )
    assert want in err and "300-token vocabulary" in err
    # the suggested command is a valid command line of this CLI
    cmd = want.split("`")[1]
    build_parser().parse_args(shlex.split(cmd)[1:])


def test_perplexity_hint_names_a_named_model_by_its_name(
    capsys, tiny_lm_dir, exit_setup, monkeypatch
):
    import earlyexit.io.registry as registry

    monkeypatch.setitem(registry.NAMED, "tinynamed", registry.NAMED["smollm2"])
    real = registry.resolve_model
    monkeypatch.setattr(
        registry, "resolve_model", lambda m: tiny_lm_dir if str(m) == "tinynamed" else real(m)
    )
    data = exit_setup / "data"
    code, err = _err(capsys, "eval", "perplexity", "--model", "tinynamed", "--data", str(data))
    assert code == 1
    assert f"--tokenizer tinynamed --out {data}-tinynamed`" in err


def test_serve_draft_gate_choices_are_the_library_s():
    from earlyexit.decoding.speculative import GATES, make_gate

    sv = build_parser()._subparsers._group_actions[0].choices["serve"]
    (action,) = [a for a in sv._actions if a.dest == "draft_gate"]
    assert tuple(action.choices) == GATES and action.default == "measured"
    assert [make_gate(g).fixed for g in GATES] == [None, True, False]
    with pytest.raises(ValueError, match="measured"):
        make_gate("sometimes")
