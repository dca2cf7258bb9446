"""`earlyexit prepare`: deterministic split, skipped files counted, no-op reruns, tokenizer."""

import json

import numpy as np
import pytest

from earlyexit.errors import InputError
from earlyexit.tokenizer import EOT, Tokenizer
from earlyexit.training.corpus import is_validation, prepare, split_documents, stdlib_files
from earlyexit.training.tokenizer import train_bpe


def _corpus(root, n=40):
    root.mkdir()
    for i in range(n):
        (root / f"f{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * 7}\n" * 20)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_text("   \n")
    (root / ".hidden").write_text("not me")
    return root


def test_prepare_writes_tokens_manifest_and_tokenizer(tmp_path):
    src = _corpus(tmp_path / "src")
    m = prepare([str(src)], tmp_path / "out", vocab_size=300, val_fraction=0.1, log=lambda *a: None)
    out = tmp_path / "out"
    assert m["counts"]["skipped"] == 2
    assert {s["reason"] for s in m["skipped"]} == {"not UTF-8", "empty"}
    assert m["counts"]["train_docs"] + m["counts"]["val_docs"] == 40
    assert m["counts"]["val_docs"] >= 1 and m["dtype"] == "uint16"
    tok = Tokenizer.from_file(out / "tokenizer.json")
    assert tok.vocab_size == 300 and tok.token_to_id(EOT) == m["eot_id"] == 0
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    assert len(train) == m["counts"]["train_tokens"]
    assert (train == m["eot_id"]).sum() == m["counts"]["train_docs"]  # one EOT per document
    assert train[-1] == m["eot_id"]
    first = train[: np.argmax(train == m["eot_id"])].tolist()
    assert tok.decode(first).startswith("def f")


def test_rerun_is_a_noop_and_changes_rebuild(tmp_path):
    src = _corpus(tmp_path / "src")
    out = tmp_path / "out"
    prepare([str(src)], out, vocab_size=300, log=lambda *a: None)
    stamp = (out / "train.bin").stat().st_mtime_ns
    msgs = []
    prepare([str(src)], out, vocab_size=300, log=msgs.append)
    assert (out / "train.bin").stat().st_mtime_ns == stamp and "up to date" in msgs[0]
    (src / "f00.txt").write_text("changed\n" * 10)
    prepare([str(src)], out, vocab_size=300, log=lambda *a: None)
    assert (out / "train.bin").stat().st_mtime_ns != stamp


def test_given_tokenizer_is_reused(tmp_path):
    src = _corpus(tmp_path / "src")
    prepare([str(src)], tmp_path / "a", vocab_size=300, log=lambda *a: None)
    m = prepare(
        [str(src / "f0*.txt")],
        tmp_path / "b",
        tokenizer=tmp_path / "a" / "tokenizer.json",
        log=lambda *a: None,
    )
    assert m["tokenizer"]["source"].endswith("tokenizer.json")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert m["counts"]["train_docs"] + m["counts"]["val_docs"] == 10


def test_split_is_deterministic_and_by_name():
    assert is_validation("stdlib/json/decoder.py", 0.02) == is_validation(
        "stdlib/json/decoder.py", 0.02
    )
    names = [f"doc{i}" for i in range(5000)]
    share = sum(is_validation(n, 0.02) for n in names) / len(names)
    assert 0.015 < share < 0.025


def test_single_document_is_split_by_lines(tmp_path):
    from earlyexit.training.corpus import Document

    doc = Document("one", "".join(f"line {i}\n" for i in range(100)), "x")
    train, val = split_documents([doc], 0.1)
    assert train[0].text + val[0].text == doc.text and val[0].text.startswith("line 90")


def test_bad_corpora(tmp_path):
    with pytest.raises(InputError, match="no such file, folder or matching glob"):
        prepare([str(tmp_path / "missing")], tmp_path / "o", log=lambda *a: None)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match=r"no readable UTF-8 text.*1 file"):
        prepare([str(tmp_path / "bin")], tmp_path / "o", log=lambda *a: None)
    with pytest.raises(InputError, match="vocab-size"):
        prepare([str(tmp_path / "bin")], tmp_path / "o", vocab_size=100, log=lambda *a: None)


def test_stdlib_sources_exclude_tests_and_site_packages():
    names = [n for n, _ in stdlib_files()]
    assert "stdlib/json/decoder.py" in names
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    assert len(names) > 300


def test_trained_tokenizer_round_trips_arbitrary_text():
    tok = train_bpe(["def main():\n    pass\n" * 50, "émoji 🎉 and tabs\t"], vocab_size=300)
    for s in ["", "x", "héllo wörld", "🎉🎉 \t\n\r", "\x00\x01 binary", "def main(argv):"]:
        assert tok.decode(tok.encode(s)) == s


def test_prepare_cli_json(tmp_path, capsys):
    from earlyexit.cli import main

    src = _corpus(tmp_path / "src", n=5)
    assert (
        main(
            [
                "prepare",
                "--corpus",
                str(src),
                "--out",
                str(tmp_path / "o"),
                "--vocab-size",
                "300",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["train_docs"] == 4
