"""Mixture-of-Recursions forward pass: per-token recursion depth (arXiv 2507.10524 §2-3).

Steps are [prefix] + N_r recursions of K shared blocks + [suffix] (middle-cycle: the first
and last layers are unique). At each recursion r the router picks which tokens continue;
only they run the recursion's K steps, gathered in their original order with their original
RoPE positions, attending causally **among themselves**. Rows with the same number of
selected tokens run as one (G, k, d) batch, so no padding is computed: a recursion costs
exactly its routed tokens (``MoROutput.computed`` counts them; in decoding, rows that stop
cost nothing). With a KV cache this is recursion-wise caching: recursion r's slots receive
only the tokens that reached r, so a token never attends to (or recomputes) states a
shallower token skipped. Under KV sharing without a cache, recursion 1's keys and values are
kept per batch row with a validity mask, so nothing but a row's own tokens is attended.

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
    computed: list[int] = field(default_factory=list)  # token-recursions run, per recursion


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
    ar = torch.arange(T, device=dev)[None, :]
    all_rows = np.arange(B) if rows is None else np.asarray(rows)
    shared: dict = {}  # KV sharing, uncached: recursion 1's K/V per batch row (see _stash)
    computed: list[int] = []  # token-recursions computed, per recursion
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
        counts = sel.sum(1).cpu().numpy()  # a host sync per recursion (ragged subsets)
        if counts.max() == 0:
            break
        # Rows with equal counts run together, each group without padding: a recursion
        # computes exactly the tokens routed to it (decode: only rows that continue).
        computed.append(0)
        for c in np.unique(counts[counts > 0]).tolist():
            g = np.nonzero(counts == c)[0]
            gi = torch.as_tensor(g, device=dev)[:, None]  # (G, 1)
            # the group's selected indices in causal order, exactly c per row
            idx = torch.sort(torch.where(sel[gi[:, 0]], ar, T), dim=1).values[:, :c]  # (G, c)
            h_sel = h[gi, idx]  # (G, c, d)
            seg_sel = None if segments is None else segments[gi, idx]
            ctx_r = model.context(
                positions[gi, idx], cache, None if cache is None else all_rows[g], segments=seg_sel
            )
            if r > 0:  # KV sharing: later recursions read recursion 1's K/V of every token
                ctx_r.shared = {
                    s: tuple(None if t is None else t[gi[:, 0]] for t in v)
                    for s, v in shared.items()
                }
            out = model.run_steps(steps.start, steps.stop, h_sel, ctx_r)
            if r == 0:
                _stash(shared, ctx_r.shared, g, c, B, T, dev)
            if routers.kind == "expert":
                if cfg.router.gating == "replace":
                    new = out
                else:
                    new = h_sel + gate[gi, idx][..., None].to(out.dtype) * out
            else:
                last = (choice[gi, idx] == r)[..., None]
                gt = gate_tc[gi, idx][..., None].to(out.dtype)
                new = torch.where(last, h1[gi, idx] + gt * out, out)
            h = h.index_put((gi.expand_as(idx), idx), new)
            computed[-1] += len(g) * c
        runs = runs + sel.long()
        candidates = sel
    if mode == "train" and B > 1:
        # dead tokens: positions no sequence of the batch routes to the last recursion (all
        # of them when no token at all reached it)
        metrics["dead_token_ratio"] = (~(runs == len(recs)).any(0)).float().mean().detach()
    h = model.run_steps(suffix.start, suffix.stop, h, ctx)
    hist = torch.bincount(runs[valid], minlength=len(recs) + 1).float()
    metrics.update({f"depth_share@{d}": v for d, v in enumerate((hist / hist.sum()).tolist()) if d})
    return MoROutput(model.logits(h), runs, aux, metrics, computed)


def _stash(shared: dict, written: dict, g: np.ndarray, c: int, B: int, T: int, dev) -> None:
    """Gather the keys, values, positions and documents that recursion 1 of the rows ``g``
    (``c`` tokens each) wrote for KV sharing into per-batch-row tensors of width T, with a
    validity mask: rows of other groups, and padding, are never attended."""
    gi = torch.as_tensor(g, device=dev)
    for slot, (k, v, pos, seg, _) in written.items():
        if slot not in shared:
            Hkv, D = k.shape[1], k.shape[3]
            shared[slot] = (
                k.new_zeros(B, Hkv, T, D),
                v.new_zeros(B, Hkv, T, D),
                pos.new_zeros(B, T),
                None if seg is None else seg.new_zeros(B, T),
                torch.zeros(B, T, dtype=torch.bool, device=dev),
            )
        fk, fv, fpos, fseg, fvalid = shared[slot]
        fk[gi, :, :c] = k  # (G, Hkv, c, D)
        fv[gi, :, :c] = v
        fpos[gi, :c] = pos
        if fseg is not None:
            fseg[gi, :c] = seg
        fvalid[gi, :c] = True
