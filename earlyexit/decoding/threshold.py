"""FREE's adaptive exit threshold: a two-component Beta mixture fitted online (free.md §3).

- Samples: at every synchronized deep pass with n >= 1 stacked tokens, n + 1 pairs
  (confidence c_k, y_k), y_k = 1 iff the shallow argmax equals the deep argmax at that
  position (the trigger token included). A deep pass with an empty stack logs nothing.
  Samples accumulate across sequences until the threshold freezes; then they are no
  longer logged (no refit would read them).
- Fit: confidences clipped to [1e-4, 1 - 1e-4]; component 0 = disagree, 1 = agree;
  responsibilities are the hard labels as the official code ends up with (0.9995 / 0.0005);
  each component is a weighted method-of-moments Beta fit,
  alpha = m (m (1 - m) / v - 1), beta = alpha (1 - m) / m. Mixing weights are unused.
- Threshold: on 10 points evenly spaced in [0.3, 0.9], the equal-prior posterior of the
  component with the larger mean; with k points above zeta = 0.4, lambda = grid[clamp(10 - k)].
- Schedule: lambda starts at the user's value; it is refitted at the start of each new
  sequence until ``max_fits`` sequences (300 in the T5 scripts) have started, then frozen.
  In a batch, B rows starting together count as B sequences and trigger one refit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

GRID = tuple(float(x) for x in np.linspace(0.3, 0.9, 10))


def beta_moments(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted method-of-moments Beta(alpha, beta) fit."""
    w = w / w.sum()
    m = float((w * x).sum())
    v = float((w * (x - m) ** 2).sum())
    v = max(v, 1e-12)
    common = m * (1 - m) / v - 1
    alpha = max(m * common, 1e-6)
    return alpha, max(alpha * (1 - m) / m, 1e-6)


def beta_logpdf(x: float, a: float, b: float) -> float:
    return (
        (a - 1) * math.log(x)
        + (b - 1) * math.log1p(-x)
        - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    )


@dataclass
class BetaMixtureThreshold:
    """Online Beta-mixture calibration of FREE's exit threshold; ``state()`` shows it."""

    initial: float = 0.9
    zeta: float = 0.4
    max_fits: int = 300
    conf: list[float] = field(default_factory=list)
    agree: list[int] = field(default_factory=list)
    value: float = field(init=False)
    sequences: int = 0
    fits: int = 0
    params: tuple[tuple[float, float], tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        self.value = self.initial

    def observe(self, confs: list[float], labels: list[int]) -> None:
        """Log (confidence, agreement) pairs from one synchronized deep pass. Once the
        threshold is frozen no refit will read them, so they are dropped (the log stays
        bounded however long the calibrator serves)."""
        if self.frozen:
            return
        self.conf.extend(confs)
        self.agree.extend(labels)

    @property
    def frozen(self) -> bool:
        """No more refits: ``max_fits`` sequences have started."""
        return self.sequences >= self.max_fits

    def start_sequences(self, n: int = 1) -> float:
        """``n`` sequences start: refit (while fewer than ``max_fits`` started); return lambda."""
        if not self.frozen:
            self.refit()
        self.sequences += n
        return self.value

    def refit(self) -> None:
        y = np.asarray(self.agree, dtype=np.int64)
        if len(y) < 2 or y.min() == y.max():  # needs both classes
            return
        x = np.clip(np.asarray(self.conf, dtype=np.float64), 1e-4, 1 - 1e-4)
        resp1 = np.where(y == 1, 0.9995, 0.0005)
        p0 = beta_moments(x, 1 - resp1)  # disagree
        p1 = beta_moments(x, resp1)  # agree
        self.params = (p0, p1)
        mean = [a / (a + b) for a, b in self.params]
        hi, lo = (p1, p0) if mean[1] >= mean[0] else (p0, p1)
        k = 0
        for g in GRID:
            la, lb = beta_logpdf(g, *hi), beta_logpdf(g, *lo)
            post = 1.0 / (1.0 + math.exp(lb - la)) if lb - la < 700 else 0.0
            k += post > self.zeta
        self.value = GRID[min(max(10 - k, 0), 9)]
        self.fits += 1

    def state(self) -> dict:
        return {
            "threshold": self.value,
            "initial": self.initial,
            "samples": len(self.conf),
            "agree_rate": float(np.mean(self.agree)) if self.agree else None,
            "sequences": self.sequences,
            "fits": self.fits,
            "frozen": self.frozen,
            "beta_disagree": self.params[0] if self.params else None,
            "beta_agree": self.params[1] if self.params else None,
        }
