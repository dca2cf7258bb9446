"""The decoding-strategy interface: which steps each row runs, one position at a time.

A strategy turns a batch of rows into next-token logits (the generation loop samples) or,
for strategies that decide tokens themselves (self-speculation), into tokens; either way it
reports, per token, how many plan steps it ran (its *depth*). Sampling, stopping and
streaming live in ``generate.py`` and are shared by every strategy. The model stays pure
compute; strategies call ``embed`` / ``run_steps`` / ``exit_logits`` on row subsets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache


@dataclass
class StepOutput:
    """What a strategy returns for one call.

    Attributes:
        logits: next-token logits (B, V), for the loop to sample; or None when
            ``tokens`` is given.
        depths: plan steps the next token of each row ran (host ints).
        tokens: tokens already decided per row (one or more), or None.
        token_depths: depth of each of ``tokens``.
    """

    logits: Tensor | None
    depths: list[int]
    tokens: list[list[int]] | None = None
    token_depths: list[list[int]] | None = None


class Strategy(ABC):
    """Decides which steps each row runs. Subclasses hold their own per-batch state."""

    name: str = "strategy"
    greedy_only: bool = False  # decides tokens itself (argmax): sampling is refused
    cache_slack: int = 0  # extra cache entries a call may write beyond the sequence

    def make_cache(self, model: Decoder, batch_size: int, length: int) -> KVCache:
        """The KV cache one generation runs on (a fresh one unless a strategy keeps its own)."""
        return KVCache.for_model(model, batch_size, length)

    def begin(self, model: Decoder, cache: KVCache, batch_size: int, max_new_tokens: int) -> None:  # noqa: B027 (an optional hook)
        """Called once per generation before ``prefill`` (reset per-batch state)."""

    def prefill(
        self, model: Decoder, cache: KVCache, tokens: Tensor, lens: np.ndarray
    ) -> StepOutput:
        """Right-padded prompts ``tokens`` (B, T) with ``lens`` valid tokens per row. The
        default runs every step (every strategy here prefills at full depth)."""
        B, T = tokens.shape
        positions = model.default_positions((B, T), cache)
        ctx = model.context(positions, cache, n_new=lens)
        h = model.run_steps(0, model.n_steps, model.embed(tokens), ctx)  # (B, T, d)
        last = torch.as_tensor(lens - 1, device=h.device)
        h_last = h[torch.arange(B, device=h.device), last]  # (B, d): only these need logits
        return StepOutput(model.logits(h_last), [model.n_steps] * B)

    @abstractmethod
    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        """Process one new token per row, ``tokens`` (B,).

        ``n_new`` (B,) is 1 for rows that advance and 0 for finished rows, whose cache must
        not grow; None means every row advances.
        """

    def stats(self) -> dict:
        """Strategy-specific counters for reports (exit rate, threshold state, ...)."""
        return {}


def slot_positions(
    model: Decoder, cache: KVCache, step: int, rows: np.ndarray, T: int = 1
) -> Tensor:
    """Positions (len(rows), T) continuing ``rows`` in the KV slot of plan step ``step``."""
    dev = model.tok_embeddings.weight.device
    start = torch.as_tensor(cache.lengths[model.plan[step].kv_slot, rows], device=dev)
    return start[:, None] + torch.arange(T, device=dev)[None, :]


def run_rows(
    model: Decoder,
    cache: KVCache,
    h: Tensor,
    start: int,
    stop: int,
    rows: np.ndarray,
    n_new: np.ndarray | None = None,
) -> Tensor:
    """Run steps ``start .. stop-1`` on ``h`` (len(rows), T, d) for cache ``rows``; positions
    continue each row's cache at step ``start``."""
    positions = slot_positions(model, cache, start, rows, h.shape[1])
    all_rows = len(rows) == cache.batch_size and np.array_equal(rows, np.arange(len(rows)))
    ctx = model.context(positions, cache, rows=None if all_rows else rows, n_new=n_new)
    return model.run_steps(start, stop, h, ctx)
