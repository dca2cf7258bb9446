"""Learning-rate schedules as pure functions of the step (nothing to save but the step).

- ``cosine``: linear warmup to ``lr``, cosine decay to ``min_lr_ratio * lr`` at ``steps``.
- ``wsd``: warmup-stable-decay (trapezoid; MoR's schedule): linear warmup, constant, then a
  linear decay to ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the steps.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def lr_at(
    step: int,
    *,
    lr: float,
    steps: int,
    warmup: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    floor = lr * min_lr_ratio
    if schedule == "cosine":
        span = max(steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(round(steps * decay_fraction), 1)
        decay_start = steps - decay_steps
        if step < decay_start:
            return lr
        progress = min((step - decay_start) / decay_steps, 1.0)
        return lr + (floor - lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
