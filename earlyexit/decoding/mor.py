"""Router-decided depth for Mixture-of-Recursions models: the causal inference path.

The official MoR code cannot generate: decoding with top-k sends every token through every
recursion. Here each token's recursions are decided causally, by its own router scores
(expert-choice: sigmoid(z) > 0.5 within the hierarchy; token-choice: its argmax depth),
prompts and generated tokens alike, with recursion-wise KV caching (``models/mor.py``).
Every generated token reports its depth in plan steps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy
from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache
from earlyexit.models.mor import step_depth


class RouterDepth(Strategy):
    """Each token runs the recursions its router grants (causal routing)."""

    name = "mor"

    def __init__(self) -> None:
        self.recursions: list[int] = []
        # token-recursions the forwards computed, and those the routers granted: equal,
        # since a recursion runs only its routed tokens (models/mor.py)
        self.token_recursions = {"computed": 0, "routed": 0}

    def _count(self, out) -> None:
        self.token_recursions["computed"] += sum(out.computed)
        self.token_recursions["routed"] += int(out.recursions.sum())

    def prefill(
        self, model: Decoder, cache: KVCache, tokens: Tensor, lens: np.ndarray
    ) -> StepOutput:
        B, T = tokens.shape
        positions = model.default_positions((B, T), cache)
        out = model(tokens, positions, cache, n_new=lens, routing="causal", return_routing=True)
        self._count(out)
        last = torch.as_tensor(lens - 1, device=tokens.device)
        b = torch.arange(B, device=tokens.device)
        depth = step_depth(model, out.recursions[b, last]).tolist()
        return StepOutput(out.logits[b, last], depth)

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B = tokens.shape[0]
        positions = model.default_positions((B, 1), cache)
        out = model(
            tokens[:, None], positions, cache, n_new=n_new, routing="causal", return_routing=True
        )
        self._count(out)
        runs = out.recursions[:, 0]
        self.recursions += runs.tolist()
        return StepOutput(out.logits[:, 0], step_depth(model, runs).tolist())

    def stats(self) -> dict:
        hist = np.bincount(self.recursions) if self.recursions else np.zeros(1)
        return {
            "recursion_histogram": hist.tolist(),
            "tokens": len(self.recursions),
            "token_recursions": dict(self.token_recursions),
        }
