"""Training objectives: pluggable loss functions over model outputs.

The training loop knows nothing about what is being learned. An :class:`Objective` takes
the model and a batch and returns a scalar loss plus metrics to log. Later techniques add
their own (exit losses, distillation from a teacher, router losses) to ``OBJECTIVES``; the
loop, checkpointing, resume and multi-process training are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
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


class LanguageModeling(Objective):
    """Plain next-token prediction at full depth (pretraining)."""

    name = "lm"

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> LossOutput:
        loss = cross_entropy(model(inputs), targets)
        return LossOutput(loss, {"ce": loss.detach()})


OBJECTIVES: dict[str, type[Objective]] = {"lm": LanguageModeling}


def get_objective(name: str, cfg=None) -> Objective:
    """The objective ``name``, configured from a ``TrainConfig`` where it takes options."""
    from earlyexit.errors import ConfigError
    from earlyexit.training.exit_losses import ExitClassifierTraining, ExitTraining

    if name == "exits":
        if cfg is None:
            return ExitTraining()
        return ExitTraining(cfg.exit_loss, cfg.exit_coef, cfg.kd_alpha)
    if name == "exit-classifier":
        return ExitClassifierTraining()
    if name not in OBJECTIVES:
        known = [*OBJECTIVES, "exits", "exit-classifier"]
        raise ConfigError(f"unknown objective {name!r}; available: {', '.join(known)}")
    return OBJECTIVES[name]()


@torch.no_grad()
def evaluate_nll(model: nn.Module, batches) -> tuple[float, int]:
    """Mean token NLL of ``model`` over ``batches`` of (inputs, targets); returns (nll, tokens)."""
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for x, y in batches:
        logits = model(x.to(dev))
        total += F.cross_entropy(
            logits.float().flatten(0, 1), y.to(dev).flatten(), reduction="sum"
        ).item()
        count += y.numel()
    return total / max(count, 1), count
