"""Full-depth decoding and static exit: every token runs the same number of steps."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy, run_rows
from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache


class FullDepth(Strategy):
    """Run all steps for every token (the baseline every exit is measured against)."""

    name = "full"

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B = tokens.shape[0]
        h = run_rows(
            model, cache, model.embed(tokens[:, None]), 0, model.n_steps, np.arange(B), n_new
        )
        return StepOutput(model.logits(h[:, 0]), [model.n_steps] * B)


class StaticExit(Strategy):
    """Every generated token exits after ``step`` steps (prompts still run at full depth).

    Deeper KV slots stay at the prompt length: no later token reads them, because no later
    token runs those steps.
    """

    name = "static"

    def __init__(self, step: int) -> None:
        self.step = step

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B = tokens.shape[0]
        h = run_rows(model, cache, model.embed(tokens[:, None]), 0, self.step, np.arange(B), n_new)
        return StepOutput(model.exit_logits(h[:, 0], self.step), [self.step] * B)
