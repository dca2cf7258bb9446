"""Full-depth decoding: every token runs every step of the plan (the baseline of all exits)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy
from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache


class FullDepth(Strategy):
    """Run all steps for every token."""

    name = "full"

    def prefill(
        self, model: Decoder, cache: KVCache, tokens: Tensor, lens: np.ndarray
    ) -> StepOutput:
        B, T = tokens.shape
        positions = model.default_positions((B, T), cache)
        ctx = model.context(positions, cache, n_new=lens)
        h = model.run_steps(0, model.n_steps, model.embed(tokens), ctx)  # (B, T, d)
        last = torch.as_tensor(lens - 1, device=h.device)
        h_last = h[torch.arange(B, device=h.device), last]  # (B, d): only these need logits
        return StepOutput(model.logits(h_last), [model.n_steps] * B)

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B = tokens.shape[0]
        positions = model.default_positions((B, 1), cache)
        ctx = model.context(positions, cache, n_new=n_new)
        h = model.run_steps(0, model.n_steps, model.embed(tokens[:, None]), ctx)  # (B, 1, d)
        return StepOutput(model.logits(h[:, 0]), [model.n_steps] * B)
