"""What every training objective is: the types ``losses.py`` and ``exit_losses.py`` share.

An :class:`Objective` takes the model and a batch and returns a :class:`LossOutput` (a scalar
loss to backpropagate plus detached metrics to log). The concrete objectives live in
``losses.py`` (language modeling, recursive uptraining) and ``exit_losses.py`` (exit
training, exit classifiers); both import this module and neither imports the other at
module level (``losses.get_objective`` reaches ``exit_losses`` only when asked for it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LossOutput:
    """A scalar ``loss`` to backpropagate and detached ``metrics`` (name -> scalar tensor)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class: ``__call__(model, inputs, targets) -> LossOutput``."""

    name = "objective"

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> LossOutput:
        raise NotImplementedError

    def setup(self, model: nn.Module) -> None:
        """Hook run once before training (e.g. load a teacher). Default: nothing."""


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in fp32; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
