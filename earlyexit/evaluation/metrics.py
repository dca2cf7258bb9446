"""Quality and speed of a strategy against full depth: the prompts, the metrics, the timing.

Token match (position-wise) and ROUGE-L (on token ids) compare a strategy's greedy output
with the full model's; :func:`timed_decode` times a strategy's decoding. ``eval agreement``,
the demo and the ``early-exit``, ``drafts`` and ``serve-strategies`` benchmarks measure
through these, so every quality number in the project is the same computation.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def validation_prompts(data_dir: str | Path, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens from evenly spaced offsets of the validation split
    (never the training split)."""
    from earlyexit.training.data import token_file

    val = token_file(data_dir, "val")
    if len(val) < n * length:
        raise ValueError(f"the validation split has {len(val)} tokens; {n} x {length} needed")
    starts = np.linspace(0, len(val) - length - 1, n).astype(np.int64)
    return [val[s : s + length].astype(np.int64).tolist() for s in starts]


def lcs(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 on token ids."""
    m = lcs(candidate, reference)
    if m == 0:
        return 0.0
    p, r = m / len(candidate), m / len(reference)
    return 2 * p * r / (p + r)


def token_match(candidate: list[int], reference: list[int]) -> float:
    """Fraction of reference positions where the candidate has the same token."""
    n = len(reference)
    return sum(1 for a, b in zip(candidate, reference) if a == b) / max(n, 1)


def agreement(outputs: list[list[int]], references: list[list[int]]) -> dict:
    """Mean token match and ROUGE-L of ``outputs`` against the full model's ``references``."""
    return {
        "token_match": float(np.mean([token_match(o, r) for o, r in zip(outputs, references)])),
        "rouge_l": float(np.mean([rouge_l(o, r) for o, r in zip(outputs, references)])),
        "identical": all(o == r for o, r in zip(outputs, references)),
    }


def timed_decode(model, prompts, params, strategy, batch_size: int = 1) -> tuple[float, list]:
    """Decode ``prompts`` in batches of ``batch_size`` with one strategy object; returns
    (seconds, results). Every strategy comparison times its decoding through this."""
    from earlyexit.decoding.generate import generate

    results = []
    t = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        results += generate(model, prompts[i : i + batch_size], params, strategy=strategy)
    _sync(model)
    return time.perf_counter() - t, results


def _sync(model) -> None:
    """Wait for the model's queued device work (timing on CUDA measures finished work, not
    launches)."""
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
