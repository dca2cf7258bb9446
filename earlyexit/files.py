"""Where earlyexit keeps its files, and how it writes them so a kill never leaves half of one.

- :func:`home` is ``$EARLYEXIT_HOME`` (default ``~/.cache/earlyexit``): converted named
  models (``models/``), compiled kernels and their measurements (``kernels/``), the demo's
  work folders. The one place that reads the variable.
- :func:`atomic_file` / :func:`atomic_write` write one file: into a temporary file in the
  same directory, fsynced, renamed over the target with ``os.replace``, the directory
  fsynced. A reader sees the old file or the new one, never a partial one.
- :func:`atomic_dir` does the same for a directory (a checkpoint, a draft): everything is
  written into a temporary sibling, which replaces the target when the block succeeds.

This module sits at the bottom of the package (it imports only ``errors``), so both the
compute layer (``models/``' compiled-kernel caches) and the file formats of ``io/`` use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from earlyexit.errors import CheckpointError


def home() -> Path:
    """``$EARLYEXIT_HOME``, default ``~/.cache/earlyexit`` (not created here)."""
    return Path(os.environ.get("EARLYEXIT_HOME", "~/.cache/earlyexit")).expanduser()


def fsync(path: str | Path) -> None:
    """Flush ``path`` to the disk: a file's data, or a directory's entries (a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp"):
    """Yield a temporary path in ``path``'s directory; when the block succeeds it is
    fsynced and renamed over ``path`` (and the directory fsynced). On any exception the
    temporary file is removed and ``path`` is untouched. The caller writes the temporary
    file any way it likes (``open``, ``save_file``, a compiler's ``-o``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync(path.parent)


def atomic_write(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, marker: str = "config.json"):
    """Yield a temporary sibling directory that replaces ``out_dir`` when the block succeeds.

    Every file written into it is fsynced before the rename. On any exception the temporary
    directory is removed and ``out_dir`` is untouched. An existing ``out_dir`` is only
    replaced if it is empty or holds ``marker`` (by default a ``config.json``: a model
    directory): pointing an output at a folder of unrelated files is refused, not wiped.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not _replaceable(out_dir, marker):
        raise CheckpointError(
            f"{out_dir}: refusing to replace a non-empty directory without a {marker} "
            f"(it does not look like earlyexit output)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync(f)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replaceable(path: Path, marker: str) -> bool:
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    return not any(path.iterdir()) or (path / marker).is_file()


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    fsync(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
