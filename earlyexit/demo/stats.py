"""The demo's statistics, computed once: every table cell, figure label and finding of the
report reads the values these functions return (nothing re-derives a ratio from medians).

- :func:`ratio_summary`: a ratio measured in several interleaved rounds (a strategy's time
  against full depth, a serving run's throughput against dense static batching) is the
  **median of the per-round ratios**, with the lowest and highest round as its spread.
  (Not the ratio of the medians: with three rounds the two differ by several percent, and
  the figure and the table disagreed when each took one.)
- :func:`fmt_ratio`: how such a ratio is written, in the tables and on the figures alike.
- :data:`NOISE`, :func:`ratio_verdict`: a ratio is a speedup (or a slowdown) only where
  every round is outside the ±3% band the README calls noise.
- :func:`paired_se`: the standard error of the mean per-token NLL difference of two models
  scored on the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NOISE = 0.03  # ratios within 1 ± NOISE are timing noise on these machines (README, BENCHMARKS)


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> dict:
    """``num[r] / den[r]`` per round ``r``: ``{"median", "lo", "hi", "rounds"}``.

    ``num`` and ``den`` are measured in the same rounds (``den[r]`` is round ``r``'s
    baseline); the median is over the per-round ratios, the spread is their min and max."""
    if len(num) != len(den) or not len(num):
        raise ValueError("ratio_summary needs one baseline per round, at least one round")
    ratios = sorted(float(a) / float(b) for a, b in zip(num, den))
    return {
        "median": float(np.median(ratios)),
        "lo": ratios[0],
        "hi": ratios[-1],
        "rounds": len(ratios),
    }


def fmt_ratio(median: float, lo: float | None = None, hi: float | None = None) -> str:
    """``1.05x (0.90-1.20)``; just ``1.05x`` without a spread (one round, or none drawn)."""
    text = f"{median:.2f}x"
    if lo is not None and hi is not None:
        text += f" ({lo:.2f}-{hi:.2f})"
    return text


def ratio_verdict(lo: float, hi: float, noise: float = NOISE) -> str:
    """``above``, ``below`` or ``within noise`` for a ratio whose rounds span [lo, hi].

    Above: every round above ``1 + noise``; below: every round below ``1 - noise``;
    otherwise at least one round is inside the noise band (or the rounds straddle it), and
    the run cannot call it a difference."""
    if lo > 1 + noise:
        return "above"
    if hi < 1 - noise:
        return "below"
    return "within noise"


def paired_se(a: Sequence[float], b: Sequence[float], cluster: int = 1) -> float | None:
    """Standard error of ``mean(a) - mean(b)`` for per-token NLLs ``a`` and ``b`` of two
    models on the same tokens, in the same order (a paired comparison: what both models
    find hard cancels, so it is usually far smaller than their separate errors combined).

    ``cluster``: tokens per independent unit. 1 treats every token's difference as
    independent; ``n`` averages the differences over consecutive blocks of ``n`` tokens (one
    evaluation window) and takes the standard error across blocks, which allows for the
    tokens of one window being correlated. None with fewer than two units."""
    if np.shape(a) != np.shape(b):
        raise ValueError(f"paired_se needs the same tokens: {np.shape(a)} vs {np.shape(b)}")
    d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).reshape(-1)
    if cluster < 1 or len(d) % cluster:
        raise ValueError(f"cluster must be >= 1 and divide the {len(d)} tokens, got {cluster}")
    k = len(d) // cluster
    if k < 2:
        return None
    units = d.reshape(k, cluster).mean(axis=1)
    return float(units.std(ddof=1) / math.sqrt(k))
