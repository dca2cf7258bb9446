"""Shared fixtures: tiny models built in milliseconds, a byte-level tokenizer, fp32 determinism."""

from __future__ import annotations

import pytest
import torch

from earlyexit.config import ModelConfig
from earlyexit.models.decoder import Decoder
from earlyexit.tokenizer import EOT, byte_level_tokenizer


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
    from earlyexit.checkpoint import save_checkpoint

    model = make_model(vocab_size=tokenizer.vocab_size, eos_token_ids=[tokenizer.token_to_id(EOT)])
    return save_checkpoint(model, tmp_path / "tiny", tokenizer=tokenizer)
