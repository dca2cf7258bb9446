"""``earlyexit prepare``: a corpus on disk -> tokenizer + memory-mapped token files + manifest.

- Sources: ``stdlib`` (the running interpreter's standard-library ``.py`` files, without
  test folders or site-packages: the embedded default, always present), local files,
  folders and globs, and ``hf:NAME`` (a Hugging Face dataset's ``text`` column; needs the
  optional ``datasets`` package and a network).
- Split: a document goes to validation when a hash of its name falls in the lowest
  ``val_fraction`` (default 2%): deterministic, and stable when other files change.
- Files that are unreadable or not UTF-8 are skipped and counted in the manifest, not fatal.
- Tokenizer: a byte-level BPE trained with ``tokenizers`` on the training split (default
  vocabulary 8192, ``<|endoftext|>`` = id 0), or a given ``tokenizer.json``.
- Output (``out/``): ``tokenizer.json``, ``train.bin`` and ``val.bin`` (flat token ids,
  uint16 when the vocabulary fits, else uint32; every document followed by end-of-text),
  ``manifest.json`` (sources with hashes and counts, skipped files, tokenizer hash). The
  directory is written atomically; re-running with identical inputs is a no-op.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from earlyexit.errors import InputError
from earlyexit.files import atomic_dir
from earlyexit.tokenizer import EOT, Tokenizer
from earlyexit.training.tokenizer import train_bpe

MANIFEST = "manifest.json"
DATA_FORMAT = 1
_TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass
class Document:
    name: str  # stable identifier (relative path, or dataset:row)
    text: str
    sha256: str


def stdlib_files() -> list[tuple[str, Path]]:
    """(name, path) of the interpreter's standard-library sources, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if "site-packages" in parts or "dist-packages" in parts or _TEST_DIRS & set(parts[:-1]):
            continue
        out.append(("stdlib/" + "/".join(parts), p))
    return out


def local_files(spec: str) -> list[tuple[str, Path]]:
    """Files named by a path, a folder (recursively) or a glob."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [(str(p), p)]
    if p.is_dir():
        return [(str(f), f) for f in sorted(p.rglob("*")) if f.is_file() and not _hidden(f, p)]
    hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True))
    files = [(str(h), h) for h in hits if h.is_file()]
    if not files:
        raise InputError(f"{spec}: no such file, folder or matching glob")
    return files


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def read_documents(corpus: list[str]) -> tuple[list[Document], list[dict]]:
    """Read every source; return the documents and the skipped files with reasons."""
    docs: list[Document] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for spec in corpus:
        if spec.startswith("hf:"):
            docs.extend(_hf_documents(spec[3:]))
            continue
        files = stdlib_files() if spec == "stdlib" else local_files(spec)
        for name, path in files:
            if name in seen:
                continue
            seen.add(name)
            try:
                raw = path.read_bytes()
            except OSError as e:
                skipped.append({"name": name, "reason": f"unreadable: {e.strerror or e}"})
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append({"name": name, "reason": "not UTF-8"})
                continue
            if not text.strip():
                skipped.append({"name": name, "reason": "empty"})
                continue
            docs.append(Document(name, text, hashlib.sha256(raw).hexdigest()))
    return docs, skipped


def _hf_documents(name: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"hf:{name} needs the 'datasets' package (pip install datasets) and a network"
        ) from None
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise InputError(
            f"hf:{name}: could not load the dataset ({type(e).__name__}: {e})"
        ) from None
    if "text" not in ds.column_names:
        raise InputError(f"hf:{name}: no 'text' column (columns: {', '.join(ds.column_names)})")
    for i, row in enumerate(ds):
        text = row["text"]
        if isinstance(text, str) and text.strip():
            yield Document(f"hf:{name}:{i}", text, hashlib.sha256(text.encode()).hexdigest())


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split: the document's name hashed into [0, 1)."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return h < val_fraction


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Train and validation documents; validation is never empty when there are >= 2 docs."""
    if len(docs) == 1:  # one document: hold out its last lines
        lines = docs[0].text.splitlines(keepends=True)
        cut = max(1, int(len(lines) * (1 - val_fraction)))
        if cut >= len(lines):
            raise InputError(
                f"{docs[0].name}: a single one-line document cannot be split into train and validation"
            )
        a, b = "".join(lines[:cut]), "".join(lines[cut:])
        return [Document(docs[0].name, a, docs[0].sha256)], [
            Document(docs[0].name + "#val", b, docs[0].sha256)
        ]
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    if not val:  # tiny corpora: hold out the document that hashes lowest
        val = [min(docs, key=lambda d: hashlib.sha256(d.name.encode()).digest())]
    names = {d.name for d in val}
    train = [d for d in docs if d.name not in names]
    if not train:
        raise InputError("every document fell into validation; lower --val-fraction")
    return train, val


def _inputs_hash(
    docs: list[Document], vocab_size: int, val_fraction: float, tok_hash: str | None
) -> str:
    h = hashlib.sha256(f"{DATA_FORMAT}|{vocab_size}|{val_fraction}|{tok_hash}".encode())
    for d in sorted(docs, key=lambda d: d.name):
        h.update(f"{d.name}\0{d.sha256}\n".encode())
    return h.hexdigest()


def _write_tokens(docs: list[Document], tok: Tokenizer, eot: int, path: Path, dtype) -> int:
    n = 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), 256):
            batch = docs[i : i + 256]
            for ids in tok.encode_batch([d.text for d in batch]):
                arr = np.asarray([*ids, eot], dtype=dtype)
                f.write(arr.tobytes())
                n += len(arr)
    return n


def prepare(
    corpus: list[str] | None = None,
    out: str | Path = "data/stdlib",
    vocab_size: int = 8192,
    tokenizer: str | Path | None = None,
    val_fraction: float = 0.02,
    log=print,
) -> dict:
    """Prepare a corpus for training; returns the manifest. See the module docstring."""
    corpus = corpus or ["stdlib"]
    if not 0 < val_fraction < 1:
        raise InputError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if tokenizer is None and not 257 + 1 <= vocab_size <= 2**32:
        raise InputError(f"--vocab-size must be > 257 (256 bytes + end-of-text), got {vocab_size}")
    out = Path(out)
    docs, skipped = read_documents(corpus)
    if not docs:
        raise InputError(
            f"the corpus {' '.join(corpus)} has no readable UTF-8 text ({len(skipped)} file(s) skipped)"
        )
    if tokenizer is not None:  # a tokenizer.json, a model directory or a named model
        from earlyexit.io.registry import resolve_model

        tokenizer = resolve_model(tokenizer)
        if tokenizer.is_dir():
            tokenizer = tokenizer / "tokenizer.json"
    given = Tokenizer.from_file(tokenizer) if tokenizer is not None else None
    tok_hash = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest() if tokenizer else None
    inputs = _inputs_hash(docs, vocab_size if given is None else -1, val_fraction, tok_hash)
    old = out / MANIFEST
    if old.is_file():
        try:
            m = json.loads(old.read_text())
            if m.get("inputs_sha256") == inputs and all(
                (out / f).is_file() for f in ("tokenizer.json", "train.bin", "val.bin")
            ):
                log(
                    f"{out}: up to date ({m['counts']['train_tokens']:,} train / {m['counts']['val_tokens']:,} val tokens)"
                )
                return m
        except (ValueError, KeyError, TypeError):
            pass  # a damaged manifest: rebuild
    train, val = split_documents(docs, val_fraction)
    log(
        f"{len(docs)} documents ({len(train)} train, {len(val)} validation), {len(skipped)} skipped"
    )
    if given is None:
        log(f"training a byte-level BPE tokenizer (vocabulary {vocab_size}) on the training split")
        tok = train_bpe((d.text for d in train), vocab_size)
    else:
        tok = given
    eot = tok.token_to_id(EOT)
    if eot is None:
        ids = tok.special_ids()
        if not ids:
            raise InputError(
                f"{tokenizer}: the tokenizer has no end-of-text token ({EOT}, </s>, ...)"
            )
        eot = ids[0]
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    with atomic_dir(out, marker=MANIFEST) as tmp:
        tok.save(tmp / "tokenizer.json")
        n_train = _write_tokens(train, tok, eot, tmp / "train.bin", dtype)
        n_val = _write_tokens(val, tok, eot, tmp / "val.bin", dtype)
        manifest = {
            "format": DATA_FORMAT,
            "inputs_sha256": inputs,
            "corpus": corpus,
            "val_fraction": val_fraction,
            "dtype": np.dtype(dtype).name,
            "eot_id": eot,
            "tokenizer": {
                "vocab_size": tok.vocab_size,
                "sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
                "source": str(tokenizer) if tokenizer else "trained",
            },
            "counts": {
                "train_docs": len(train),
                "val_docs": len(val),
                "skipped": len(skipped),
                "train_tokens": n_train,
                "val_tokens": n_val,
            },
            "skipped": skipped,
            "sources": [
                {"name": d.name, "sha256": d.sha256, "split": s}
                for s, ds in (("train", train), ("val", val))
                for d in ds
            ],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"wrote {out}: {n_train:,} train / {n_val:,} validation tokens ({np.dtype(dtype).name})")
    return manifest
