"""The attention/KV seam: which attention a forward runs, chosen once per forward context.

``Decoder.context`` calls :func:`choose` and stores the answer as ``ForwardContext.backend``;
``Attention.forward`` projects q, k, v and calls ``ATTEND[ctx.backend]``, which appends the
new keys and values to the cache and attends. Nothing per layer decides anything.

Backends (all return the attention output (B, H, T, D)):

- ``uncached``: no cache: SDPA, causal (or the context's window / document mask). KV-sharing
  slots keep their keys and values in ``ctx.shared`` for the recursions that read them.
- ``sdpa``: every row at the step's slot: ``KVCache.update`` appends and returns the rows'
  keys and values (views when the rows are contiguous) and a mask; one SDPA call.
- ``kernel``: the compiled decode kernel (``decode_kernel.py``): each row writes its new
  entries into its own (slot, row) block and attends over it in one pass, rows at one slot
  (a plain step) or at several (depth-wise). ``KVCache.reserve`` advances the lengths.
- rows at different KV slots of one shared block (depth-wise batching) on PyTorch:
  ``per-slot`` (one SDPA call per distinct slot over views of it for all the rows, each row
  keeping its own slot's output: every history read once per slot, few launches),
  ``per-row`` (one call per row over a view of exactly its own history: each history read
  once, one launch per row), ``gather`` (each row's history gathered into one batch: the
  first design, kept as the ablation).

What the cache asks for (``KVCache.attention``, fixed when the cache is made or set on it by
a benchmark): ``auto`` takes the kernel wherever it applies (the cache carries one, CPU fp32,
at most ``MAX_CHUNK`` new tokens per row, no sliding window, no KV-sharing slots, autograd
off), otherwise ``sdpa`` for a plain call and, for a depth-wise call, ``per-row`` once
(distinct slots - 1) x the longest history reaches ``PER_ROW_MIN_ENTRIES`` entries, else
``per-slot``. ``sdpa`` never takes the kernel (the ablation); ``kernel`` takes it or raises;
``per-slot``, ``per-row`` and ``gather`` name the depth-wise path (plain calls stay as
``auto``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from earlyexit.models.decode_kernel import MAX_CHUNK

UNCACHED, SDPA, KERNEL = "uncached", "sdpa", "kernel"
PER_SLOT, PER_ROW, GATHER = "per-slot", "per-row", "gather"
AUTO = "auto"
REQUESTS = (AUTO, SDPA, KERNEL, PER_SLOT, PER_ROW, GATHER)  # what KVCache.attention may say

# "auto" goes row by row when (distinct slots - 1) x the longest history reaches this many
# entries: the extra reads of the per-slot path then cost more than the per-row launches
# (measured on this CPU at the SmolLM shape: BENCHMARKS.md, ``depthwise --calls``)
PER_ROW_MIN_ENTRIES = 256


def choose(ctx) -> str:
    """The backend of every attention call of the forward context ``ctx`` (see the module
    docstring): from its cache (kernel, device, dtype, what it asks for), the rows' slots and
    lengths, the new tokens per row, the window, KV sharing and whether autograd is on."""
    cache = ctx.cache
    if cache is None:
        return UNCACHED
    request = cache.attention
    if request not in REQUESTS:
        raise ValueError(f"KVCache.attention must be one of {REQUESTS}, got {request!r}")
    T = ctx.positions.shape[1]
    why_not = _why_not_kernel(ctx, T)
    if request == KERNEL:
        if why_not is not None:
            raise ValueError(f"the decode kernel does not apply here: {why_not}")
        return KERNEL
    depthwise = ctx.kv_slots is not None
    if why_not is None and request != SDPA and (request == AUTO or not depthwise):
        return KERNEL
    if not depthwise:
        return SDPA
    if request in (PER_SLOT, PER_ROW, GATHER):
        return request
    if ctx.sliding_window is not None or ctx.stash_slots:
        return PER_SLOT  # windows and KV sharing read positions: the per-slot path has them
    rows = np.arange(len(ctx.kv_slots)) if ctx.rows is None else ctx.rows
    extra_slots = len(set(ctx.kv_slots.tolist())) - 1
    longest = int(cache.lengths[ctx.kv_slots, rows].max()) + T
    return PER_ROW if extra_slots * longest >= PER_ROW_MIN_ENTRIES else PER_SLOT


def _why_not_kernel(ctx, T: int) -> str | None:
    """Why the decode kernel cannot serve this context (None: it can)."""
    cache = ctx.cache
    buf = cache.k_all
    if cache.kernel is None:
        return "the cache carries no kernel (KVCache.for_model loads it for CPU fp32 models)"
    if T > MAX_CHUNK:
        return f"{T} new tokens per row (the kernel takes at most {MAX_CHUNK})"
    if buf.device.type != "cpu" or buf.dtype != torch.float32:
        return f"a {buf.device.type} {buf.dtype} cache (the kernel is CPU float32)"
    if ctx.sliding_window is not None:
        return "a sliding window"
    if ctx.stash_slots:
        return "KV-sharing slots"
    if torch.is_grad_enabled():
        return "autograd is on"
    return None


# ---------------------------------------------------------------------- the backends
def _uncached(q: Tensor, k: Tensor, v: Tensor, ctx, slot: int, gqa: bool) -> Tensor:
    mask = ctx.uncached_mask()
    if slot in ctx.stash_slots:  # later recursions will read these (KV sharing)
        ctx.shared[slot] = (k, v, ctx.positions, ctx.segments, None)  # all valid
    if mask is None and q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, ctx, slot: int, gqa: bool) -> Tensor:
    """One slot for every row (or, ``gather``, each row's history gathered from its own)."""
    k, v, mask = ctx.cache.update(slot, k, v, ctx)  # (B, Hkv, W, D), mask (B|1, 1, T, W)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _kernel(q: Tensor, k: Tensor, v: Tensor, ctx, slot: int, gqa: bool) -> Tensor:
    if q.requires_grad:
        raise RuntimeError(
            "a forward context built with autograd off was used with autograd on: the decode "
            "kernel has no backward (build the context where the forward runs)"
        )
    cache = ctx.cache
    blocks, starts, n_new = cache.reserve(slot, q.shape[0], q.shape[2], ctx)
    return cache.kernel.append_attend(q, k, v, cache.k_all, cache.v_all, blocks, starts, n_new)


def _per_slot(q: Tensor, k: Tensor, v: Tensor, ctx, slot: int, gqa: bool) -> Tensor:
    y = None
    for k_s, v_s, mask, member in ctx.cache.update_slots(k, v, ctx):
        y_s = F.scaled_dot_product_attention(q, k_s, v_s, attn_mask=mask, enable_gqa=gqa)
        y = y_s if y is None else torch.where(member[:, None, None, None], y_s, y)
    return y


def _per_row(q: Tensor, k: Tensor, v: Tensor, ctx, slot: int, gqa: bool) -> Tensor:
    y = q.new_zeros(q.shape)  # padding queries' outputs stay 0
    for b, n, k_b, v_b, mask in ctx.cache.update_rows(k, v, ctx):
        y[b : b + 1, :, :n] = F.scaled_dot_product_attention(
            q[b : b + 1, :, :n], k_b, v_b, attn_mask=mask, enable_gqa=gqa
        )
    return y


# backend -> attend(q (B, H, T, D), k, v (B, Hkv, T, D), ctx, kv_slot, gqa) -> (B, H, T, D)
ATTEND = {
    UNCACHED: _uncached,
    SDPA: _sdpa,
    GATHER: _sdpa,  # KVCache.update gathers when the rows are at different slots
    KERNEL: _kernel,
    PER_SLOT: _per_slot,
    PER_ROW: _per_row,
}
