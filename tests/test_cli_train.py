"""`earlyexit train`'s flags are generated from TrainConfig: one flag per field and no other,
typed, documented and constrained by the dataclass."""

import dataclasses
import shlex

import pytest

from earlyexit.cli import build_parser, train_config_from_args
from earlyexit.cli.common import attribute_docs
from earlyexit.errors import ConfigError
from earlyexit.training.config import EXIT_LOSSES, NONFINITE, TrainConfig, check_choice

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
# the command's own flags, which are not part of a run's config
OWN = {"help", "preset", "config", "list_presets", "resume", "no_progress", "json"}


def _train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def _actions():
    return {a.dest: a for a in _train_parser()._actions}


def test_every_field_is_a_flag_and_every_flag_a_field():
    actions = _actions()
    assert set(actions) - OWN == set(FIELDS)
    for name in FIELDS:
        assert f"--{name.replace('_', '-')}" in actions[name].option_strings
        assert actions[name].default is None  # only given flags override a recipe
    assert "--dtype" in actions["precision"].option_strings  # the older name still works


def test_every_field_is_documented_in_the_docstring():
    docs = attribute_docs(TrainConfig)
    assert set(docs) == set(FIELDS)
    actions = _actions()
    assert "AdamW betas" in actions["beta2"].help
    assert "(default: 256)" in actions["seq_len"].help
    assert "``" not in actions["exit_loss"].help and ":func:" not in actions["precision"].help


def test_choices_are_the_library_s_and_the_flag_refuses_what_validate_refuses(capsys):
    from earlyexit.dtypes import PRECISIONS
    from earlyexit.training.exit_losses import EXIT_LOSSES as implemented
    from earlyexit.training.schedule import SCHEDULES

    actions = _actions()
    assert tuple(actions["schedule"].choices) == SCHEDULES
    assert tuple(actions["precision"].choices) == PRECISIONS
    assert tuple(actions["nonfinite"].choices) == NONFINITE
    assert tuple(actions["exit_loss"].choices) == EXIT_LOSSES == implemented
    for name, value in (
        ("precision", "float16"),
        ("precision", "fp8"),
        ("schedule", "linear"),
        ("nonfinite", "ignore"),
        ("exit_loss", "bogus"),
    ):
        with pytest.raises(ConfigError) as refused:
            TrainConfig(**{name: value}).validate()
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["train", f"--{name.replace('_', '-')}", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(refused.value) in err, err
        with pytest.raises(ConfigError):
            check_choice(name, value)


def _other_value(f: dataclasses.Field):
    """A valid value of field ``f`` other than its default."""
    if "choices" in f.metadata:
        return next(c for c in f.metadata["choices"] if c != f.default)
    if f.name == "exit_steps":
        return (2, 4)
    if f.name == "train_only":
        return ("exit_", "norm")
    if isinstance(f.default, bool):
        return not f.default
    if isinstance(f.default, int):
        return f.default + 3
    if isinstance(f.default, float):
        return f.default / 2
    if f.name in ("flops_budget",):
        return 1e12
    if f.name == "exit_adapter_rank":
        return 8
    return f"{f.name}-x"


def test_every_flag_sets_its_field():
    want = TrainConfig(**{f.name: _other_value(f) for f in dataclasses.fields(TrainConfig)})
    argv = ["train"]
    for name, value in dataclasses.asdict(want).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    got = train_config_from_args(build_parser().parse_args(argv))
    got = dataclasses.replace(
        got, exit_steps=tuple(got.exit_steps), train_only=tuple(got.train_only)
    )
    assert got == want, shlex.join(argv)


def test_unset_flags_keep_the_recipe_s_values(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"steps": 7, "exit_norms": true, "schedule": "wsd"}')
    args = build_parser().parse_args(["train", "--config", str(cfg), "--lr", "0.01"])
    got = train_config_from_args(args)
    assert (got.steps, got.exit_norms, got.schedule, got.lr) == (7, True, "wsd", 0.01)
    args = build_parser().parse_args(["train", "--config", str(cfg), "--no-exit-norms"])
    assert train_config_from_args(args).exit_norms is False
