"""Named training runs: ``earlyexit train --preset NAME`` reads ``earlyexit/recipes/NAME.json``.

A recipe file is a :class:`~earlyexit.training.config.TrainConfig` JSON with a
``description``, the same format ``--config FILE`` reads: copy one to make your own. Every
recipe must run as documented on 2 CPU cores. Files are checked as strictly as a user's
config when the package loads them (unknown keys, wrong types: refused, named).
"""

from __future__ import annotations

from typing import Any

from earlyexit.datafiles import read_named, summary
from earlyexit.errors import ConfigError
from earlyexit.strict import parse_dataclass
from earlyexit.training.config import TrainConfig


def _load() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    recipes, descriptions = {}, {}
    for name, (description, body) in read_named("recipes").items():
        try:
            parse_dataclass(TrainConfig, body, "")
        except ConfigError as e:
            raise ConfigError(f"earlyexit/recipes/{name}.json: {e}") from None
        # the fields as written (lists as tuples): TrainConfig(**recipe, **flags) as before
        recipes[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in body.items()}
        descriptions[name] = description
    return recipes, descriptions


# name -> TrainConfig fields the recipe sets; name -> its description
RECIPES, DESCRIPTIONS = _load()


def list_recipes() -> list[str]:
    """One line per recipe: its name and the first sentence of its description."""
    width = max(map(len, RECIPES), default=0)
    return [f"{name:<{width}}  {summary(DESCRIPTIONS.get(name, ''))}" for name in RECIPES]
