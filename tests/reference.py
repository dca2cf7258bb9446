"""Slow, obviously-correct references written from the papers' equations, for tests.

Independent of ``earlyexit.models`` except for reading weights: their own RMSNorm, RoPE,
grouped-query attention and SwiGLU (``layer``), and a Mixture-of-Recursions forward
(``mor_reference``, arXiv 2507.10524 §2-3; mor.md §2) run one row at a time, each
recursion on the explicit list of tokens that reached it:

- expert-choice: candidates at r are the tokens selected at r-1; ``train`` keeps the top
  k = max(1, floor(c_r T)) scores among them, ``causal`` keeps those with sigmoid(z) > 0.5
  (the auxiliary router's z when there is one), capacity-1 recursions keep everyone;
  update ``code``: H + g F(H), g = alpha sigmoid(z) (or tanh); ``replace``: F(H).
- token-choice: depth i = argmax(alpha softmax(logits) + bias); recursion r runs tokens
  with i >= r; intermediate H <- F(H), at r = i: H_1 + g F(H), g = alpha softmax_i.
- attention in a recursion sees only the tokens selected there (recursion-wise caching),
  or, under KV sharing, every token's recursion-1 keys and values at positions <= its own.

Tests compare the model (and, through single-request generation, the engine) to these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta):
    """x (n, heads, D) rotated by integer positions pos (n,) (rotate-half convention)."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None, :]  # (n, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :].to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _lin(x, w, b):
    return x @ w.T + (0 if b is None else b)


def layer(cfg, blk, x, pos, shared_kv=None):
    """One pre-norm layer on tokens x (n, d) at positions pos (n,). Keys: this call's own
    (causal), or ``shared_kv`` = (k, v, kpos) attended where kpos <= the query's position.
    Returns the output and this call's (rotated k, v, pos)."""
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n = x.shape[0]
    W, b = blk.attn.wqkv.weight, blk.attn.wqkv.bias
    qd, kvd = H * D, Hkv * D
    xn = rms(x, blk.attn_norm.weight, cfg.norm_eps)
    q = rope(_lin(xn, W[:qd], None if b is None else b[:qd]).view(n, H, D), pos, cfg.rope_theta)
    k = _lin(xn, W[qd : qd + kvd], None if b is None else b[qd : qd + kvd]).view(n, Hkv, D)
    k = rope(k, pos, cfg.rope_theta)
    v = _lin(xn, W[qd + kvd :], None if b is None else b[qd + kvd :]).view(n, Hkv, D)
    own = (k, v, pos)
    keys, vals, kpos = own if shared_kv is None else shared_kv
    out = torch.zeros(n, H, D, dtype=x.dtype)
    for i in range(n):  # one query at a time
        seen = kpos <= pos[i]
        for h in range(H):
            g = h // (H // Hkv)
            s = (keys[seen, g] @ q[i, h]) / math.sqrt(D)
            out[i, h] = s.softmax(0) @ vals[seen, g]
    h_mid = x + _lin(out.reshape(n, qd), blk.attn.wo.weight, blk.attn.wo.bias)
    hn = rms(h_mid, blk.mlp_norm.weight, cfg.norm_eps)
    gu = _lin(hn, blk.mlp.w13.weight, blk.mlp.w13.bias)
    z = F.silu(gu[:, : cfg.d_ff]) * gu[:, cfg.d_ff :]
    return h_mid + _lin(z, blk.mlp.w2.weight, blk.mlp.w2.bias), own


def router(net, h, kind):
    """A router's output from its weights: ``linear`` d -> out without bias, ``mlp``
    d -> 2d -> out with GELU (mor.md §1)."""
    if kind == "linear":
        return h @ net.weight.T
    first, last = net[0], net[-1]
    return F.gelu(h @ first.weight.T + first.bias) @ last.weight.T + last.bias


def _plan_parts(plan):
    recs = sorted({s.recursion for s in plan if s.recursion is not None})
    per_rec = [[i for i, s in enumerate(plan) if s.recursion == r] for r in recs]
    return per_rec[0][0], per_rec, per_rec[-1][-1] + 1


@torch.no_grad()
def mor_reference(m, tokens, mode="causal", lens=None, metrics=None):
    """Logits (B, T, V) (zero beyond each row's length), recursions (B, T) and the weighted
    router loss of MoR model ``m`` on ``tokens`` (B, T); ``lens``: valid tokens per row.
    ``metrics``: a dict to fill with the training metrics as the paper / mor.md define them
    (router sampling accuracy per recursion, dead tokens, depth shares, MaxVio)."""
    cfg, R = m.config, m.routers
    rc = cfg.router
    B, T = tokens.shape
    lens = [T] * B if lens is None else [int(n) for n in lens]
    first, recs, last = _plan_parts(m.plan)
    kv_sharing = rc.kv_sharing
    head = m.tok_embeddings.weight if m.head is None else m.head.weight
    logits = torch.zeros(B, T, cfg.vocab_size)
    runs = torch.zeros(B, T, dtype=torch.long)
    bce_sum = [0.0] * len(recs)
    aux_bce_sum = [0.0] * len(recs)
    cand_count = [0] * len(recs)
    agree = [0] * len(recs)  # candidates whose sign(z) (aux: sign(aux z)) matches selection
    aux_agree = [0] * len(recs)
    last_sel = torch.zeros(B, T, dtype=torch.bool)  # who reached the last recursion
    probs_all, choice_all, dlogits_all = [], [], []
    for b in range(B):
        n = lens[b]
        pos = torch.arange(n)
        h = m.tok_embeddings.weight[tokens[b, :n]]
        for i in range(first):
            h, _ = layer(cfg, m.blocks[m.plan[i].block], h, pos)
        h1 = h.clone()
        active = torch.ones(n, dtype=torch.bool)
        if rc.kind == "token":
            dl = router(R.nets[0], h1, rc.router).float()  # (n, N)
            probs = dl.softmax(-1) * rc.gate_scale
            choice = (probs + R.bias).argmax(-1)
            gate = probs[torch.arange(n), choice]
            probs_all.append(probs)
            choice_all.append(choice)
            dlogits_all.append(dl)
        stash = {}
        for r, steps in enumerate(recs):
            if rc.kind == "token":
                sel = choice >= r
            else:
                z = router(R.nets[r], h, rc.router).squeeze(-1).float()
                cap = cfg.capacities[r]
                if cap >= 1:
                    sel = active.clone()
                elif mode == "train":
                    k = max(1, math.floor(cap * T))
                    top = z.masked_fill(~active, float("-inf")).topk(k).indices
                    sel = torch.zeros(n, dtype=torch.bool)
                    sel[top] = True
                    sel &= active
                elif rc.aux_router:  # an MLP that decides at inference
                    sel = active & (router(R.aux[r], h, "mlp").squeeze(-1) > 0)
                else:
                    sel = active & (z > 0)
                if mode == "train" and cap < 1:
                    t = sel.float()
                    bce = -(t * F.logsigmoid(z) + (1 - t) * F.logsigmoid(-z))
                    bce_sum[r] += float(bce[active].sum())
                    cand_count[r] += int(active.sum())
                    agree[r] += int(((z > 0) == sel)[active].sum())
                    if rc.aux_router:
                        az = router(R.aux[r], h, "mlp").squeeze(-1).float()
                        abce = -(t * F.logsigmoid(az) + (1 - t) * F.logsigmoid(-az))
                        aux_bce_sum[r] += float(abce[active].sum())
                        aux_agree[r] += int(((az > 0) == sel)[active].sum())
                g_act = torch.sigmoid(z) if rc.activation == "sigmoid" else torch.tanh(z)
                gate = rc.gate_scale * g_act
            idx = sel.nonzero().flatten()  # ascending: causal order
            if len(idx) == 0:
                break
            y = h[idx]
            for j, i in enumerate(steps):
                blk = m.blocks[m.plan[i].block]
                kv = stash[j] if kv_sharing and r > 0 else None
                y, own = layer(cfg, blk, y, pos[idx], kv)
                if r == 0:
                    stash[j] = own
            h = h.clone()
            if rc.kind == "token":
                at_last = choice[idx] == r
                h[idx] = torch.where(at_last[:, None], h1[idx] + gate[idx, None] * y, y)
            elif rc.gating == "replace":
                h[idx] = y
            else:
                h[idx] = h[idx] + gate[idx, None] * y
            runs[b, idx] += 1
            active = sel
            if r == len(recs) - 1:
                last_sel[b, :n] = sel
        for i in range(last, len(m.plan)):
            h, _ = layer(cfg, m.blocks[m.plan[i].block], h, pos)
        logits[b, :n] = rms(h, m.norm.weight, cfg.norm_eps) @ head.T
    if metrics is not None:
        valid = torch.arange(T)[None, :] < torch.tensor(lens)[:, None]
        for d in range(1, len(recs) + 1):
            metrics[f"depth_share@{d}"] = float((runs[valid] == d).float().mean())
        if mode == "train" and rc.kind == "expert":
            for r in range(len(recs)):
                if cand_count[r]:
                    metrics[f"router_accuracy@{r + 1}"] = agree[r] / cand_count[r]
                    if rc.aux_router:
                        metrics[f"aux_router_accuracy@{r + 1}"] = aux_agree[r] / cand_count[r]
        if mode == "train" and B > 1:
            metrics["dead_token_ratio"] = float((~last_sel.any(0)).float().mean())
        if rc.kind == "token":
            load = torch.bincount(torch.cat(choice_all), minlength=len(recs)).float()
            metrics["max_violation"] = float((load.max() - load.mean()) / load.mean())
    loss = torch.zeros(())
    if mode == "train" and rc.kind == "expert":
        for r in range(len(recs)):
            if cand_count[r]:
                loss = loss + rc.aux_coef * bce_sum[r] / cand_count[r]
                loss = loss + aux_bce_sum[r] / cand_count[r]
    elif mode == "train" and rc.kind == "token":
        probs, choice, dl = torch.cat(probs_all), torch.cat(choice_all), torch.cat(dlogits_all)
        N = probs.shape[-1]
        f = torch.stack([(choice == i).float().mean() * N for i in range(N)])
        loss = rc.balance_coef * (f * probs.mean(0)).sum()
        loss = loss + rc.z_coef * torch.logsumexp(dl, -1).pow(2).mean()
    return logits, runs, loss
