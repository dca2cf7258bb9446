"""Checkpoint contract: round trip, atomic replace, and every bad-input case named."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from earlyexit.errors import CheckpointError
from earlyexit.io.checkpoint import load_checkpoint, save_checkpoint
from earlyexit.tokenizer import Tokenizer
from tests.conftest import make_model


def test_round_trip_is_exact(tmp_path, tokenizer):
    model = make_model(vocab_size=300)
    save_checkpoint(model, tmp_path / "c", tokenizer)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    back, tok = load_checkpoint(tmp_path / "c")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert tok.encode("héllo wörld") == tokenizer.encode("héllo wörld")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["format_version"] == 1


def test_load_in_bfloat16(tmp_path):
    save_checkpoint(make_model(), tmp_path / "c")
    back, tok = load_checkpoint(tmp_path / "c", dtype=torch.bfloat16)
    assert tok is None
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())


def test_shared_model_stores_only_unique_blocks(tmp_path):
    model = make_model(n_layers=6, sharing={"scheme": "cycle", "loops": 3})
    save_checkpoint(model, tmp_path / "c")
    keys = load_file(tmp_path / "c" / "model.safetensors").keys()
    assert {k.split(".")[1] for k in keys if k.startswith("blocks.")} == {"0", "1"}
    back, _ = load_checkpoint(tmp_path / "c")
    x = torch.randint(0, 512, (1, 8))
    with torch.inference_mode():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_save_replaces_atomically_and_leaves_no_temp(tmp_path):
    a, b = make_model(seed=1), make_model(seed=2)
    save_checkpoint(a, tmp_path / "c")
    save_checkpoint(b, tmp_path / "c")
    back, _ = load_checkpoint(tmp_path / "c")
    assert torch.equal(back.tok_embeddings.weight, b.tok_embeddings.weight)
    assert os.listdir(tmp_path) == ["c"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(make_model(seed=1), tmp_path / "c")
    import earlyexit.io.checkpoint as ck

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(make_model(seed=2), tmp_path / "c")
    back, _ = load_checkpoint(tmp_path / "c")
    assert torch.equal(back.tok_embeddings.weight, make_model(seed=1).tok_embeddings.weight)
    assert os.listdir(tmp_path) == ["c"]


@pytest.fixture
def saved(tmp_path):
    return save_checkpoint(make_model(), tmp_path / "c")


def test_missing_and_wrong_paths(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config.json"):
        load_checkpoint(tmp_path / "empty")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors: no such weights file"):
        load_checkpoint(saved)


def test_truncated_weights_are_refused(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt or truncated"):
        load_checkpoint(saved)


def test_garbage_weights_are_refused(saved):
    (saved / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(saved)


def test_missing_unexpected_and_misshaped_tensors(saved):
    w = saved / "model.safetensors"
    sd = load_file(w)
    save_file({k: v for k, v in sd.items() if k != "blocks.2.attn.wo.weight"}, w)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) blocks\.2\.attn\.wo\.weight"):
        load_checkpoint(saved)
    save_file({**sd, "blocks.9.extra": torch.zeros(2)}, w)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) blocks\.9\.extra"):
        load_checkpoint(saved)
    save_file({**sd, "norm.weight": torch.zeros(7)}, w)
    with pytest.raises(
        CheckpointError, match=r"tensor norm\.weight has shape \(7,\), expected \(64,\)"
    ):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    "edit, msg",
    [
        (
            lambda c: c.update(d_model=65),
            r"tok_embeddings\.weight has shape \(512, 64\), expected \(512, 65\)",
        ),
        (lambda c: c.update(n_heads=3), "multiple of n_kv_heads"),
        (lambda c: c.update(n_layers="4"), "n_layers: expected an integer"),
        (lambda c: c.update(hidden_size=64), "unknown key"),
        (lambda c: c.update(format_version=99), "format_version 99 is newer"),
        (lambda c: c.pop("format_version"), "missing 'format_version'"),
    ],
)
def test_bad_config_files(saved, edit, msg):
    p = saved / "config.json"
    cfg = json.loads(p.read_text())
    edit(cfg)
    p.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(saved)


def test_invalid_json_and_hf_directory_hint(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="convert hf-import"):
        load_checkpoint(saved)


def test_tokenizer_that_does_not_fit_the_vocabulary(tmp_path, tokenizer):
    save_checkpoint(make_model(vocab_size=100), tmp_path / "c", tokenizer)
    with pytest.raises(
        CheckpointError, match="tokenizer has 257 tokens but the model's vocabulary has 100"
    ):
        load_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "c" / "tokenizer.json")


def test_never_replaces_a_directory_of_unrelated_files(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace a non-empty directory"):
        save_checkpoint(make_model(), precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["home"]


def _file_backed_ranges() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file mapping of this process (/proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[5]))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_loaded_parameters_are_aligned_and_not_file_backed(tmp_path):
    """Weights read from a checkpoint must live in ordinary 64-byte aligned memory: views
    into the safetensors memory map (8-byte aligned, file-backed) made decoding 3x slower."""
    save_checkpoint(make_model(n_layers=3), tmp_path / "m")
    model, _ = load_checkpoint(tmp_path / "m")
    maps = _file_backed_ranges()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert tensors
    for name, t in tensors:
        ptr = t.data_ptr()
        assert ptr % 64 == 0, f"{name} is at {ptr % 64} bytes past a 64-byte boundary"
        backing = [path for lo, hi, path in maps if lo <= ptr < hi]
        assert not backing, f"{name} lives in a file mapping: {backing[0]}"
