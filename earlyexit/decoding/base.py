"""The decoding-strategy interface: which steps each row runs, one token at a time.

A strategy turns a batch of rows into next-token logits and reports, per row, how many
steps of the plan its token ran (its *depth*). Sampling, stopping and streaming live in
``generate.py`` and are shared by every strategy; exit policies (static, CALM, FREE,
self-speculation, MoR routing) are strategies. The model stays pure compute.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache


@dataclass
class StepOutput:
    """What a strategy returns for one position of every row.

    Attributes:
        logits: next-token logits (B, V).
        depths: steps of the plan each row's token ran (host ints).
    """

    logits: Tensor
    depths: list[int]


class Strategy(ABC):
    """Decides which steps each row runs. Subclasses hold their own per-batch state."""

    name: str = "strategy"

    @abstractmethod
    def prefill(
        self, model: Decoder, cache: KVCache, tokens: Tensor, lens: np.ndarray
    ) -> StepOutput:
        """Process right-padded prompts ``tokens`` (B, T) with ``lens`` valid tokens per row."""

    @abstractmethod
    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        """Process one new token per row, ``tokens`` (B,).

        ``n_new`` (B,) is 1 for rows that advance and 0 for finished rows, whose cache must
        not grow; None means every row advances.
        """
