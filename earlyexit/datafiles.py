"""Named configurations shipped as JSON files inside the package.

- ``earlyexit/presets/NAME.json``: model shapes, the body of a ``ModelConfig`` JSON without
  its ``name`` (``ModelConfig.from_name``, ``--model NAME``).
- ``earlyexit/recipes/NAME.json``: training runs, a ``TrainConfig`` JSON (``earlyexit train
  --preset NAME``; the same file works as ``--config FILE``, so a user copies one to make
  their own).

The file's stem is the name. Each file is one JSON object with an optional
``"description"`` string (what the comments next to the old Python dicts said); every other
key is checked as strictly as a user's config file (unknown keys and wrong types refused,
named) by the loaders that use these files.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from earlyexit.errors import ConfigError


def split_description(data: Any, source: str) -> tuple[str, dict[str, Any]]:
    """(description, the rest) of a JSON object read from ``source``; refuses a non-object
    or a non-string description."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    rest = dict(data)
    description = rest.pop("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{source}: 'description' must be a string, got {description!r}")
    return description, rest


def read_named(folder: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (description, body) of every ``earlyexit/<folder>/*.json``, sorted by name."""
    root = resources.files("earlyexit") / folder
    out = {}
    for f in sorted(root.iterdir(), key=lambda f: f.name.removesuffix(".json")):
        if not f.name.endswith(".json"):
            continue
        source = f"earlyexit/{folder}/{f.name}"
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        out[f.name.removesuffix(".json")] = split_description(data, source)
    return out


def summary(description: str) -> str:
    """The first sentence of a description: what one line of a listing shows."""
    first = description.strip().split("\n\n")[0].replace("\n", " ")
    head, dot, _ = first.partition(". ")
    return head + ("." if dot else "")
