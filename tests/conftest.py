"""Shared fixtures: tiny models built in milliseconds, a byte-level tokenizer, fp32 determinism."""

from __future__ import annotations

import os

import pytest
import torch

from earlyexit.config import ModelConfig
from earlyexit.models.decoder import Decoder
from earlyexit.tokenizer import EOT, byte_level_tokenizer

# The linear kernels by the fixed rule, without timing them first (models/linear_choice.py:
# the compiled kernel for 1-4 fp32 rows, oneDNN elsewhere): the suite runs the same kernels on
# every machine, and no test measures anything by accident. tests/test_linear_choice.py
# exercises the measured choice itself.
os.environ.setdefault("EARLYEXIT_LINEAR", "fixed")
# `auto` precision and dtype resolve to float32 in the suite on every CPU (bf16 where the CPU
# has AVX512-BF16/AMX otherwise): a test means the same on every machine. Tests of the bf16
# path force it with EARLYEXIT_NATIVE_BF16=1 themselves (emulated where the CPU lacks it).
os.environ.setdefault("EARLYEXIT_NATIVE_BF16", "0")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def make_model(preset: str = "tiny", seed: int = 0, **overrides) -> Decoder:
    """A random-init model in eval mode. Norm weights are perturbed so tests notice a
    missing or misplaced norm (unit weights would hide it)."""
    cfg = ModelConfig.from_name(preset, **overrides)
    g = torch.Generator().manual_seed(seed)
    model = Decoder(cfg)
    model.init_weights(generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def tiny() -> Decoder:
    return make_model()


@pytest.fixture
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture
def tiny_lm_dir(tmp_path, tokenizer):
    """A saved tiny checkpoint whose vocabulary matches the byte-level tokenizer."""
    from earlyexit.io.checkpoint import save_checkpoint

    model = make_model(vocab_size=tokenizer.vocab_size, eos_token_ids=[tokenizer.token_to_id(EOT)])
    return save_checkpoint(model, tmp_path / "tiny", tokenizer=tokenizer)


@pytest.fixture
def exit_lm_dir(tmp_path, tokenizer):
    """A saved tiny checkpoint with one trained exit after step 2 of 4."""
    from earlyexit.io.checkpoint import save_checkpoint

    model = make_model(
        vocab_size=tokenizer.vocab_size,
        eos_token_ids=[tokenizer.token_to_id(EOT)],
        exits={"steps": [2], "trained": True},
        init_std=0.3,
    )
    return save_checkpoint(model, tmp_path / "exits", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def exit_setup(tmp_path_factory):
    """A tiny prepared corpus and a tiny model with an exit, saved as a checkpoint."""
    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.tokenizer import Tokenizer
    from earlyexit.training.corpus import prepare
    from tests.conftest import make_model

    root = tmp_path_factory.mktemp("bench")
    src = root / "src"
    src.mkdir()
    for i in range(40):
        (src / f"m{i}.py").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(40))
        )
    prepare([str(src)], root / "data", vocab_size=300, log=lambda *a: None)
    tok = Tokenizer.from_file(root / "data" / "tokenizer.json")
    model = make_model(
        vocab_size=300, n_layers=4, exits={"steps": [1, 2], "trained": True}, init_std=0.3
    )
    save_checkpoint(model, root / "model", tokenizer=tok)
    return root
