"""Exit-training objectives (plug into the training loop as ``--objective exits`` / ``exit-classifier``).

- ``weighted`` (CALM, arXiv 2207.07061; FREE's baseline ``weighted_ce``): sum over every exit
  point of (step_i / sum of steps) x CE_i, the final exit included.
- ``aggressive`` (Relaxed Recursive Transformers §4): CE_final + c x sum over intermediate
  exits of (CE_i + KL(final || exit_i)), c = 0.1, the final distribution detached.
- ``shallow-deep`` (FREE, arXiv 2310.05424, ``shallowdeep_kd_dyna``): one intermediate exit
  at L_s; (L_s CE_s + L CE_L) / (L_s + L) + alpha x L_KD with the dynamic layer-wise
  hidden-state distillation below, alpha = 0.5.
- ``exit-classifier``: CALM's early-exit classifier on a frozen model: per intermediate exit,
  class-balanced CE on "this exit's argmax equals the final argmax".

Dynamic layer-wise KD (free.md §1): students are the normed outputs of layers 1..L_s,
teachers a fixed set of L_s deep layers (detached); M[t, s] is the mean squared error; from
the deepest teacher to the shallowest, each teacher takes the lowest-error student with an
index strictly below the previous pick (the first is unconstrained; with none left it reuses
the previous); L_KD is the mean of the chosen errors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit.errors import ConfigError
from earlyexit.training.config import EXIT_LOSSES
from earlyexit.training.objective import LossOutput, Objective, cross_entropy

# FREE's teacher layers (1-based) for the (L, L_s) pairs its code defines; others use even spacing.
KD_TEACHERS = {
    (24, 4): (6, 12, 18, 24),
    (24, 6): (4, 8, 12, 16, 20, 24),
    (24, 8): (3, 6, 9, 12, 15, 18, 21, 24),
    (24, 10): (3, 6, 8, 11, 13, 16, 18, 20, 22, 24),
    (24, 12): (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24),
    (12, 3): (4, 8, 12),
}


def kd_teachers(n_layers: int, n_shallow: int) -> tuple[int, ...]:
    """1-based teacher layers for a shallow model of ``n_shallow`` layers."""
    if (n_layers, n_shallow) in KD_TEACHERS:
        return KD_TEACHERS[(n_layers, n_shallow)]
    return tuple(round(n_layers * (j + 1) / n_shallow) for j in range(n_shallow))


def align_teachers(mse: Tensor) -> list[int]:
    """Greedy monotone alignment. ``mse`` (n_teachers, n_students); returns, per teacher in
    the given (shallow-to-deep) order, the index of its student."""
    n_t, _ = mse.shape
    picks = [0] * n_t
    prev = None
    for t in range(n_t - 1, -1, -1):  # deepest teacher first
        allowed = mse.shape[1] if prev is None else prev
        if allowed == 0:
            picks[t] = prev
            continue
        picks[t] = prev = int(mse[t, :allowed].argmin())
    return picks


def dynamic_kd(normed: list[Tensor], n_shallow: int) -> Tensor:
    """FREE's dynamic layer-wise hidden-state distillation loss."""
    teachers = kd_teachers(len(normed), n_shallow)
    students = normed[:n_shallow]
    mse = torch.stack(
        [
            torch.stack([F.mse_loss(s.float(), normed[t - 1].detach().float()) for s in students])
            for t in teachers
        ]
    )  # (n_teachers, n_students)
    picks = align_teachers(mse.detach())
    return torch.stack([mse[t, s] for t, s in enumerate(picks)]).mean()


def kl_to(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean forward KL(teacher || student) per token; the teacher is detached."""
    t = teacher_logits.detach().float().log_softmax(-1).flatten(0, -2)
    s = student_logits.float().log_softmax(-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


class ExitTraining(Objective):
    """``--objective exits``: train every exit with the chosen ``exit_loss``."""

    name = "exits"

    def __init__(
        self, exit_loss: str = "shallow-deep", exit_coef: float = 0.1, kd_alpha: float = 0.5
    ) -> None:
        if exit_loss not in EXIT_LOSSES:
            raise ConfigError(
                f"exit_loss must be one of {', '.join(EXIT_LOSSES)}, got {exit_loss!r}"
            )
        self.exit_loss, self.coef, self.alpha = exit_loss, exit_coef, kd_alpha

    def setup(self, model: nn.Module) -> None:
        steps = model.config.exits.steps
        if not steps:
            raise ConfigError(
                "--objective exits needs exit points: pass --exit-steps (e.g. --exit-steps 2)"
            )
        if self.exit_loss == "shallow-deep" and len(steps) != 1:
            raise ConfigError(
                f"the shallow-deep loss trains exactly one intermediate exit; the model has {len(steps)} ({list(steps)})"
            )
        model.config.exits.trained = True

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> LossOutput:
        out = model(inputs, exits=True)
        cfg = _config(model)
        points = cfg.exit_points
        ces = [cross_entropy(lg, targets) for lg in out.exit_logits]
        metrics = {f"ce@{s}": ce.detach() for s, ce in zip(points, ces)}
        if self.exit_loss == "weighted":
            total = sum(points)
            loss = sum(s / total * ce for s, ce in zip(points, ces))
        elif self.exit_loss == "aggressive":
            final = out.exit_logits[-1]
            kls = [kl_to(final, lg) for lg in out.exit_logits[:-1]]
            loss = ces[-1] + self.coef * sum(ce + kl for ce, kl in zip(ces[:-1], kls))
            metrics.update({f"kl@{s}": kl.detach() for s, kl in zip(points, kls)})
        else:  # shallow-deep
            ls, L = points[0], points[-1]
            kd = dynamic_kd(out.normed, ls)
            loss = (ls * ces[0] + L * ces[-1]) / (ls + L) + self.alpha * kd
            metrics["kd"] = kd.detach()
        return LossOutput(loss, metrics)


class ExitClassifierTraining(Objective):
    """``--objective exit-classifier``: train the exit classifiers of a frozen model."""

    name = "exit-classifier"

    def setup(self, model: nn.Module) -> None:
        if getattr(model, "exit_classifiers", None) is None:
            raise ConfigError("the model has no exit classifiers (train with --exit-classifier)")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("exit_classifiers."))

    def __call__(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> LossOutput:
        out = model(inputs, exits=True)
        final = out.exit_logits[-1].detach().argmax(-1)
        losses, metrics = [], {}
        points = _config(model).exit_points
        for s, lg, cls in zip(points, out.exit_logits, out.classifier_logits):
            label = (lg.detach().argmax(-1) == final).long().flatten()  # (B*T,)
            # class-balanced: each class weighted by the other's frequency
            p_agree = label.float().mean().clamp(1e-3, 1 - 1e-3)
            weight = torch.stack([p_agree, 1 - p_agree])
            loss = F.cross_entropy(cls.float().flatten(0, 1), label, weight=weight)
            acc = (cls.argmax(-1).flatten() == label).float().mean()
            losses.append(loss)
            metrics.update(
                {f"cls_loss@{s}": loss.detach(), f"cls_acc@{s}": acc, f"agree@{s}": p_agree}
            )
        return LossOutput(torch.stack(losses).mean(), metrics)


def _config(model: nn.Module):
    return getattr(model, "module", model).config
