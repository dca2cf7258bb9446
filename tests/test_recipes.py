"""Recipes and model presets are data files shipped in the package (issue 18)."""

import json
from importlib import resources

import pytest

from earlyexit.cli import build_parser, main, train_config_from_args
from earlyexit.config import PRESETS, ModelConfig
from earlyexit.datafiles import read_named
from earlyexit.errors import ConfigError
from earlyexit.training.config import TrainConfig
from earlyexit.training.recipes import DESCRIPTIONS, RECIPES


def test_every_recipe_and_preset_file_loads_with_a_description():
    assert set(RECIPES) == set(read_named("recipes")) and "stdlib-small" in RECIPES
    for name in RECIPES:
        assert DESCRIPTIONS[name], name
        TrainConfig(**RECIPES[name]).validate()
    for name, (description, _) in read_named("presets").items():
        assert description, name
        assert ModelConfig.from_name(name).name == name
    assert set(PRESETS) == set(read_named("presets"))


def test_preset_and_config_file_read_the_same_format(tmp_path):
    mine = tmp_path / "mine.json"
    for name in RECIPES:  # a user copies a recipe file to make their own
        mine.write_text((resources.files("earlyexit") / "recipes" / f"{name}.json").read_text())
        by_file = train_config_from_args(
            build_parser().parse_args(["train", "--config", str(mine)])
        )
        by_name = train_config_from_args(build_parser().parse_args(["train", "--preset", name]))
        assert by_file == by_name, name


def test_recipe_files_are_checked_strictly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"description": "x", "stpes": 3}))
    with pytest.raises(ConfigError, match="stpes"):
        TrainConfig.from_file(bad)
    bad.write_text(json.dumps({"description": 3}))
    with pytest.raises(ConfigError, match="description"):
        TrainConfig.from_file(bad)


def test_list_presets_one_line_each(capsys):
    assert main(["train", "--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == list(RECIPES)
    assert lines[-1].startswith("model presets") and "tiny" in lines[-1]
    assert main(["train", "--list-presets", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["recipes"]) == set(RECIPES) and "tiny" in out["model_presets"]


def test_preset_and_config_together_are_refused(tmp_path, capsys):
    """Both name a whole recipe: silently preferring one would train the wrong thing."""
    mine = tmp_path / "mine.json"
    mine.write_text((resources.files("earlyexit") / "recipes" / "stdlib-small.json").read_text())
    assert main(["train", "--preset", "stdlib-small", "--config", str(mine)]) == 1
    assert "--preset and --config" in capsys.readouterr().err
