"""Model FLOPs utilization: training FLOPs per token, this device's matmul peak, and their
ratio with the measured throughput (reported per step in ``metrics.jsonl`` and in the run's
summary). Not the MoR accountant's forward-only convention (``flops.py``)."""

from __future__ import annotations

import time

import torch

from earlyexit.config import ModelConfig


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5
) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype``, measured here and now (for MFU): the best
    of ``reps`` timed calls after one warm-up, so a busy moment does not lower the peak (a
    low peak is what makes MFU come out above 1)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak: float):
    """Achieved / peak FLOP/s, or None when the peak is unknown or the ratio is impossible
    (above 1: the probe ran at a slower moment than the step; reporting it would be a lie)."""
    if not peak:
        return None
    mfu = tokens_per_s * flops_per_token / peak
    return mfu if mfu <= 1.0 else None


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters run per token (shared blocks count
    once per step) + 6 x layers x seq_len x d (causal attention scores and values)."""
    per_step = mc.block_params() - 2 * mc.d_model  # matmul weights of one block
    n = mc.n_layers * per_step + mc.vocab_size * mc.d_model  # + the head
    return 6 * n + 6 * mc.n_layers * seq_len * mc.q_dim
