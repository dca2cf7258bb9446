"""Training objectives: pluggable loss functions over model outputs.

The training loop knows nothing about what is being learned. An :class:`Objective` takes
the model and a batch and returns a scalar loss plus metrics to log. Later techniques add
their own (exit losses, distillation from a teacher, router losses) to ``OBJECTIVES``; the
loop, checkpointing, resume and multi-process training are shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit.training.objective import LossOutput, Objective, cross_entropy

__all__ = [
    "OBJECTIVES",
    "LanguageModeling",
    "LossOutput",
    "Objective",
    "Uptraining",
    "cross_entropy",
    "evaluate_nll",
    "get_objective",
]


class LanguageModeling(Objective):
    """Plain next-token prediction at full depth (pretraining)."""

    name = "lm"

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> LossOutput:
        if getattr(getattr(model, "module", model), "routers", None) is not None:
            # Mixture-of-Recursions: top-k routing in training, plus the router losses
            out = model(inputs, routing="train", return_routing=True)
            ce = cross_entropy(out.logits, targets)
            metrics = {"ce": ce.detach(), "router_loss": out.aux_loss.detach(), **out.metrics}
            return LossOutput(ce + out.aux_loss, metrics)
        loss = cross_entropy(model(inputs), targets)
        return LossOutput(loss, {"ce": loss.detach()})


class Uptraining(Objective):
    """Recursive uptraining (RRT §3): LM loss + weight x forward KL(teacher || student) from a
    frozen dense teacher whose logits are computed online."""

    name = "uptrain"

    def __init__(self, teacher: str | None, weight: float = 1.0) -> None:
        from earlyexit.errors import ConfigError

        if not teacher:
            raise ConfigError("--objective uptrain needs --teacher DIR (the dense source model)")
        if weight < 0:
            raise ConfigError(f"distill weight must be >= 0, got {weight}")
        self.teacher_dir, self.weight = teacher, weight

    def setup(self, model: nn.Module) -> None:
        from earlyexit.errors import ConfigError
        from earlyexit.io.checkpoint import load_checkpoint

        device = next(model.parameters()).device
        from earlyexit.io.registry import resolve_model

        self.teacher, _ = load_checkpoint(resolve_model(self.teacher_dir), device)
        self.teacher.requires_grad_(False)
        if self.teacher.config.vocab_size != getattr(model, "config", model).vocab_size:
            raise ConfigError(
                f"{self.teacher_dir}: the teacher's vocabulary differs from the student's"
            )

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> LossOutput:
        logits = model(inputs)
        ce = cross_entropy(logits, targets)
        with torch.no_grad():
            teacher = self.teacher(inputs).float().log_softmax(-1).flatten(0, 1)
        student = logits.float().log_softmax(-1).flatten(0, 1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return LossOutput(ce + self.weight * kl, {"ce": ce.detach(), "kl": kl.detach()})


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
    if name == "uptrain":
        return Uptraining(getattr(cfg, "teacher", None), getattr(cfg, "distill_weight", 1.0))
    if name not in OBJECTIVES:
        known = [*OBJECTIVES, "exits", "exit-classifier", "uptrain"]
        raise ConfigError(f"unknown objective {name!r}; available: {', '.join(known)}")
    return OBJECTIVES[name]()


@torch.no_grad()
def evaluate_nll(model, batches, device=None) -> tuple[float, int]:
    """Mean token NLL of ``model`` (a module or a callable) over ``batches`` of (inputs,
    targets); returns (nll, tokens)."""
    total, count = 0.0, 0
    dev = device if device is not None else next(model.parameters()).device
    for x, y in batches:
        logits = model(x.to(dev))
        total += F.cross_entropy(
            logits.float().flatten(0, 1), y.to(dev).flatten(), reduction="sum"
        ).item()
        count += y.numel()
    return total / max(count, 1), count
