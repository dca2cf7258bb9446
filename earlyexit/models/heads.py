"""The LM head over a subset of the vocabulary (a pruned head), for cheap exit-side decisions.

A decode step's LM head reads a (V, d) matrix: at SmolLM2's 49,152 x 576 that is as much
weight as 8 of its 30 layers, and at the embedded models' 8192 x 256 as much as 2.7 blocks.
An exit pays that head for every token it *considers*, exited or not, which eats most of
what a shallow exit saves. FR-Spec (arXiv 2502.14856) observed that a few thousand of the
most frequent tokens carry most of a corpus; restricting an exit's head to them costs N / V
of the full head. We use it in two places:

- **drafting** (self-speculation): a token outside the set is never drafted, only emitted by
  the verifier, so the output stays identical to full depth;
- **exit decisions** (FREE, the engine's ``ExitMode``): the exit's confidence is the margin
  of the softmax over the N tokens, and an exited token is drawn from them; a token that
  goes deep is decided by the full head. This *changes* what exits emit (a token outside
  the set can only come from the deep model), so quality is measured beside speed
  (BENCHMARKS.md).

The head's rows are copied once into a contiguous (N, d) matrix (a gather at every call
would cost what it saves); the copy is refreshed when the model's head weight is replaced
or modified in place, so a pruned head never reads stale weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from earlyexit.errors import InputError
from earlyexit.models.kernels import linear


def vocabulary_ids(ids, vocab_size: int, what: str = "the vocabulary subset") -> Tensor:
    """``ids`` (token ids, any sequence) as a validated (N,) int64 tensor: non-empty, within
    [0, vocab_size), no repeats. Raises :class:`InputError` otherwise."""
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise InputError(f"{what} must be token ids within [0, {vocab_size}), non-empty")
    if torch.unique(t).numel() != t.numel():
        raise InputError(f"{what} has repeated token ids")
    return t


class PrunedHead:
    """An exit's LM head restricted to token ``ids`` (N,).

    Stateless apart from the cached (N, d) copy of the head rows; the caller applies the
    exit's norm first (``Decoder.exit_norm``), exactly as for the full head.
    """

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids
        self._rows: tuple[int, int, Tensor, Tensor] | None = None  # (weight id, version, rows, ids)

    def __len__(self) -> int:
        return self.ids.numel()

    def _weights(self, model) -> tuple[Tensor, Tensor]:
        w = model.head_weight()
        key = (id(w), w._version)
        if self._rows is None or self._rows[:2] != key:
            ids = self.ids.to(w.device)
            self._rows = (*key, w[ids].contiguous(), ids)  # (N, d): copied once
        return self._rows[2], self._rows[3]

    def logits(self, model, hn: Tensor) -> tuple[Tensor, Tensor]:
        """Logits over the subset (..., N) of normed states ``hn`` (..., d), and the ids (N,)
        their columns stand for."""
        rows, ids = self._weights(model)
        return linear(hn, rows), ids

    def full_logits(self, model, hn: Tensor) -> Tensor:
        """Logits (..., V) of normed states ``hn`` (..., d): the subset's logits in their
        columns and -inf everywhere else, so that softmax, margins, penalties and sampling
        over the full vocabulary see exactly the pruned distribution."""
        sub, ids = self.logits(model, hn)  # (..., N)
        V, N = model.config.vocab_size, ids.numel()
        out = torch.full((*hn.shape[:-1], V), float("-inf"), device=hn.device, dtype=sub.dtype)
        flat = sub.reshape(-1, N)  # scatter_ is ~3x faster here than index assignment
        out.view(-1, V).scatter_(1, ids.expand(flat.shape[0], N), flat)
        return out
