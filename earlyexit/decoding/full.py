"""Full-depth decoding and static exit: every token runs the same number of steps."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy, run_rows
from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache
from earlyexit.models.static_decode import StaticDecodeStep, static_unsupported


class FullDepth(Strategy):
    """Run all steps for every token (the baseline every exit is measured against).

    ``static``: decode through :class:`~earlyexit.models.static_decode.StaticDecodeStep`
    (fixed shapes); ``compile``: also ``torch.compile`` it (CUDA graphs on CUDA). Models the
    static step does not support (MoR, sliding window) fall back to the general path.
    """

    name = "full"

    def __init__(self, static: bool = False, compile: bool = False) -> None:
        self.static, self.compile = static or compile, compile
        self._step = None
        self._cache = None
        self._key = None

    def make_cache(self, model: Decoder, batch_size: int, length: int) -> KVCache:
        """With the static step, one cache (and its compiled step, whose shapes and buffer
        addresses it fixes) serves every generation of the same batch size and length."""
        if not self.static or static_unsupported(model) is not None:
            return super().make_cache(model, batch_size, length)
        key = (id(model), batch_size, length, model.tok_embeddings.weight.dtype)
        if self._key != key:
            self._cache = super().make_cache(model, batch_size, length)
            self._step, self._key = StaticDecodeStep(model, self._cache, self.compile), key
        self._cache.reset()
        return self._cache

    def begin(self, model: Decoder, cache: KVCache, batch_size: int, max_new_tokens: int) -> None:
        if not self.static or static_unsupported(model) is not None:
            self._step = None
        elif cache is not self._cache:  # a cache from elsewhere (tests, callers of decode)
            self._step = StaticDecodeStep(model, cache, self.compile)
            self._cache, self._key = cache, None

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B = tokens.shape[0]
        if self._step is not None:
            slots = self._step.slots
            lens = cache.lengths[slots[0], :B]  # host; every slot has the same length here
            logits = self._step(tokens, torch.as_tensor(lens, device=tokens.device))
            adv = np.ones(B, dtype=np.int64) if n_new is None else n_new
            cache.lengths[np.ix_(slots, np.arange(B))] += adv[None, :]
            return StepOutput(logits, [model.n_steps] * B)
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
