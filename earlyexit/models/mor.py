"""Mixture-of-Recursions forward pass: per-token recursion depth (arXiv 2507.10524 §2-3).

Steps are [prefix] + N_r recursions of K shared blocks + [suffix] (middle-cycle: the first
and last layers are unique). At each recursion r the router picks which tokens continue;
only they run the recursion's K steps, gathered into a (B, k, d) batch in their original
order with their original RoPE positions, attending causally **among themselves**. With a
KV cache this is recursion-wise caching: recursion r's slots receive only the tokens that
reached r, so a token never attends to (or recomputes) states a shallower token skipped.

Routing modes:
- ``train``: expert-choice keeps the top-k scores (k = max(1, floor(c_r T)), T the full
  sequence length) among the previous recursion's tokens, sorted back into causal order;
  token-choice takes each token's argmax depth. Top-k looks at the whole sequence: it is
  not causal (a token's depth can depend on later tokens); use it for training only.
- ``causal``: expert-choice keeps a candidate iff sigmoid(z) > 0.5 (recursions with
  capacity 1 keep everyone); token-choice is causal already. Generation, evaluation and
  the serving engine use this: logits at t never depend on tokens after t (tested).

Updates (expert-choice): ``code`` gating gives selected states H + g F(H) with F the
K-block output including its residual stream (the official code); ``replace`` gives F(H).
Token-choice: intermediate recursions H <- F(H); at a token's last recursion
H_1 + g F(H) with H_1 the router's input (the official code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from earlyexit.models.routers import balance_loss, expert_aux_loss, z_loss


@dataclass
class MoROutput:
    """Logits plus routing: recursions run per token, the weighted router loss, metrics."""

    logits: Tensor
    recursions: Tensor  # (B, T) int: recursions each token ran
    aux_loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def recursion_ranges(plan) -> tuple[range, list[range], range]:
    """(prefix steps, steps of each recursion, suffix steps) of a MoR plan."""
    recs: dict[int, list[int]] = {}
    for i, s in enumerate(plan):
        if s.recursion is not None:
            recs.setdefault(s.recursion, []).append(i)
    ranges = [range(v[0], v[-1] + 1) for _, v in sorted(recs.items())]
    return range(0, ranges[0].start), ranges, range(ranges[-1].stop, len(plan))


def step_depth(model, recursions: Tensor) -> Tensor:
    """Plan steps run by tokens that ran ``recursions`` recursions."""
    prefix, recs, suffix = recursion_ranges(model.plan)
    return len(prefix) + len(suffix) + recursions * len(recs[0])


def mor_forward(
    model,
    tokens: Tensor,
    mode: str,
    positions: Tensor,
    cache=None,
    rows=None,
    n_valid=None,
    segments: Tensor | None = None,
) -> MoROutput:
    """The MoR forward of ``tokens`` (B, T); see the module docstring for ``mode``."""
    cfg = model.config
    routers = model.routers
    B, T = tokens.shape
    dev = tokens.device
    prefix, recs, suffix = recursion_ranges(model.plan)
    valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    if n_valid is not None:
        valid = torch.arange(T, device=dev)[None, :] < torch.as_tensor(n_valid, device=dev)[:, None]
    ctx = model.context(positions, cache, rows, n_new=n_valid, segments=segments)
    h = model.run_steps(prefix.start, prefix.stop, model.embed(tokens), ctx)
    h1 = h
    candidates = valid
    runs = torch.zeros(B, T, dtype=torch.long, device=dev)
    aux = torch.zeros((), device=dev)
    metrics: dict[str, Tensor] = {}
    if routers.kind == "token":
        dlogits = routers.depth_logits(h1)  # (B, T, N)
        probs = dlogits.softmax(-1) * routers.alpha
        choice = (probs + routers.bias).argmax(-1)  # 0-based: the token's last recursion
        if mode == "train" and routers.bias_step > 0 and torch.is_grad_enabled():
            routers.update_bias(choice[valid])  # loss-free balancing (no gradient)
        gate_tc = probs.gather(-1, choice[..., None]).squeeze(-1)
        aux = cfg.router.balance_coef * balance_loss(probs[valid], choice[valid], routers.n)
        aux = aux + cfg.router.z_coef * z_loss(dlogits[valid])
        load = torch.bincount(choice[valid], minlength=routers.n).float()
        metrics["max_violation"] = (load.max() - load.mean()) / load.mean().clamp_min(1e-9)
    for r, steps in enumerate(recs):
        if routers.kind == "expert":
            z = routers.scores(r, h)  # (B, T)
            cap = cfg.capacities[r]
            if cap >= 1:
                sel = candidates
            elif mode == "train":
                k = max(1, math.floor(cap * T))
                top = z.masked_fill(~candidates, float("-inf")).topk(k, dim=-1).indices
                sel = torch.zeros_like(candidates).scatter(1, top, True) & candidates
            elif routers.aux is not None:
                sel = candidates & (routers.aux_scores(r, h) > 0)  # the auxiliary router decides
            else:
                sel = candidates & (z > 0)  # sigmoid(z) > 0.5, within the hierarchy
            if mode == "train" and cap < 1:
                aux = aux + cfg.router.aux_coef * expert_aux_loss(z, sel, candidates)
                if routers.aux is not None:  # the auxiliary router learns the same targets
                    az = routers.aux_scores(r, h)
                    aux = aux + expert_aux_loss(az, sel, candidates)
                    metrics[f"aux_router_accuracy@{r + 1}"] = (
                        ((az > 0) == sel)[candidates].float().mean().detach()
                    )
                agree = ((z > 0) == sel)[candidates].float().mean()
                metrics[f"router_accuracy@{r + 1}"] = agree.detach()
            gate = routers.gate(z)
        else:
            sel = candidates & (choice >= r)
        counts = sel.sum(1)
        k_max = int(counts.max())  # a host sync per recursion (ragged subsets need sizes)
        if k_max == 0:
            break
        # selected indices in causal order, right-padded per row
        order = torch.sort(torch.where(sel, torch.arange(T, device=dev)[None, :], T), dim=1).values[
            :, :k_max
        ]
        pad = order >= T
        idx = order.masked_fill(pad, 0)  # (B, k)
        h_sel = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))  # (B, k, d)
        pos_sel = positions.gather(1, idx)
        n_sel = counts.cpu().numpy().astype(np.int64)
        seg_sel = None if segments is None else segments.gather(1, idx)
        ctx_r = model.context(pos_sel, cache, rows, n_new=n_sel, segments=seg_sel)
        ctx_r.shared = ctx.shared  # KV sharing: later recursions read recursion 1's K/V
        out = model.run_steps(steps.start, steps.stop, h_sel, ctx_r)
        if routers.kind == "expert":
            if cfg.router.gating == "replace":
                new = out
            else:
                new = h_sel + gate.gather(1, idx)[..., None].to(out.dtype) * out
        else:
            last = (choice.gather(1, idx) == r)[..., None]
            g = gate_tc.gather(1, idx)[..., None].to(out.dtype)
            new = torch.where(last, h1.gather(1, idx[..., None].expand_as(h_sel)) + g * out, out)
        b_i, t_i = torch.nonzero(~pad, as_tuple=True)
        h = h.index_put((b_i, idx[b_i, t_i]), new[b_i, t_i])
        runs = runs + sel.long()
        candidates = sel
        if mode == "train" and r == len(recs) - 1 and B > 1:
            # dead tokens: positions no sequence of the batch routes to the last recursion
            metrics["dead_token_ratio"] = (~sel.any(0)).float().mean().detach()
    h = model.run_steps(suffix.start, suffix.stop, h, ctx)
    hist = torch.bincount(runs[valid], minlength=len(recs) + 1).float()
    metrics.update({f"depth_share@{d}": v for d, v in enumerate((hist / hist.sum()).tolist()) if d})
    return MoROutput(model.logits(h), runs, aux, metrics)
