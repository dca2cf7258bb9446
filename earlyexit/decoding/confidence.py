"""Exit confidence measures (CALM §3.2; FREE §3): how sure an intermediate exit is.

- ``max-prob``: the largest softmax probability.
- ``margin``: top-1 minus top-2 softmax probability (FREE's default, CALM's "softmax").
- ``saturation``: cosine similarity between this exit's hidden state and the previous exit's
  (CALM's hidden-state saturation; undefined at the first exit checked, where it is -inf).
- ``classifier``: the learned exit classifier's P(this exit agrees with the final exit).

All return a (B,) float tensor; exit when it passes the threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MEASURES = ("margin", "max-prob", "saturation", "classifier")

# The exit threshold a strategy uses when none is given (FREE's and CALM's papers start at
# 0.9: few exits, near-full quality). Every default in the package reads this one.
DEFAULT_THRESHOLD = 0.9


def confidence(
    kind: str,
    logits: Tensor,
    model=None,
    step: int | None = None,
    h: Tensor | None = None,
    h_prev: Tensor | None = None,
) -> Tensor:
    """Confidence (B,) of exit logits (B, V); ``h``/``h_prev`` (B, d) for saturation, ``model``
    and ``step`` for the classifier."""
    if kind == "margin":
        top = logits.float().softmax(-1).topk(2, dim=-1).values  # (B, 2)
        return top[:, 0] - top[:, 1]
    if kind == "max-prob":
        return logits.float().softmax(-1).amax(-1)
    if kind == "saturation":
        if h_prev is None:
            return torch.full((logits.shape[0],), float("-inf"), device=logits.device)
        return F.cosine_similarity(h.float(), h_prev.float(), dim=-1)
    if kind == "classifier":
        i = model.exit_index(step)
        cls = model.exit_classifiers[i](model.exit_norm(h, step))  # (B, 2)
        return cls.float().softmax(-1)[:, 1]
    raise ValueError(f"unknown confidence measure {kind!r}")
