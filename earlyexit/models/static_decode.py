"""A full-depth decode step with static shapes: the GPU fast path (gpt-fast style).

The general path (``kv_cache.py``) plans every cache write and read on the host, slices the
attended window to the longest row and builds masks per call: flexible (ragged rows,
per-row slots, exits, routers) but its shapes change every step, so it cannot be captured
by CUDA graphs and recompiles under ``torch.compile``. This step does the same arithmetic
for the common case, one new token per row through every step of a model without routers
or a sliding window, with shapes that never change:

- each row writes its key and value at index ``lens[b]`` of the preallocated buffers
  (one index_put per step, positions as a device tensor, no host planning);
- every query attends over the whole buffer (B, Hkv, max_len, D) with the mask
  ``j <= lens[b]``: entries past a row's length are masked, so their content never matters.

Compiled (``torch.compile``, ``mode="reduce-overhead"`` on CUDA: CUDA graphs) it is meant to
remove the per-op dispatch that dominates small-batch decoding on a GPU (not yet measured
there). On the CPU it compiles with inductor's freezing (weights prepacked as constants);
whether it beats the eager path there depends on the CPU and batch (BENCHMARKS.md ``decode``). Eager, it is a reference the tests
compare against the general path. The host keeps the cache lengths (it advances them by the
rows' ``n_new`` itself), so nothing here synchronises with the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from earlyexit.models.layers import _add_bias, _add_lora, _norm_offset, rope_cos_sin


def static_unsupported(model) -> str | None:
    """Why ``model`` cannot use the static step (None if it can)."""
    cfg = model.config
    if model.routers is not None:
        return "Mixture-of-Recursions routers decide depths per token"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if any(s.shares_kv for s in model.plan):
        return "KV sharing between steps"
    return None


class StaticDecodeStep:
    """``step(tokens (B,), lens (B,)) -> logits (B, V)`` at full depth over ``cache``.

    ``lens``: each row's current cache length (= the new token's position), on the device.
    ``compile``: wrap the step in ``torch.compile`` (CUDA graphs on CUDA).
    """

    def __init__(self, model, cache, compile: bool = False) -> None:
        reason = static_unsupported(model)
        if reason is not None:
            raise ValueError(f"the static decode step does not support {reason}")
        self.model, self.cache = model, cache
        self.slots = sorted({s.kv_slot for s in model.plan})  # every slot a step writes
        self.j = torch.arange(cache.max_len, device=cache.device)  # (W,)
        fn = self._step
        if compile:
            mode = "reduce-overhead" if cache.device.type == "cuda" else None
            # the cache is mutated in place every step: tell dynamo its buffers never move, so
            # CUDA graphs can capture the writes instead of skipping graph capture
            for t in (cache.k_all, cache.v_all):
                torch._dynamo.mark_static_address(t)
            # on the CPU, freezing: weights become constants that inductor prepacks for its
            # GEMMs and folds around (measured on the Zen 3 VM: without it the compiled step
            # was 0.6x the eager one, its linears no faster than F.linear; BENCHMARKS `decode`)
            options = {"freezing": True} if cache.device.type == "cpu" else None
            fn = torch.compile(fn, mode=mode, dynamic=False, fullgraph=False, options=options)
        self.fn = fn

    def __call__(self, tokens: Tensor, lens: Tensor) -> Tensor:
        return self.fn(tokens, lens)

    def _step(self, tokens: Tensor, lens: Tensor) -> Tensor:
        model, cache = self.model, self.cache
        B = tokens.shape[0]
        h = model.embed(tokens[:, None])  # (B, 1, d)
        cos, sin = rope_cos_sin(model.inv_freq, lens[:, None], h.dtype)  # (B, 1, 1, D)
        mask = (self.j[None, :] <= lens[:, None])[:, None, None, :]  # (B, 1, 1, W)
        rows = torch.arange(B, device=h.device)
        col = lens.clamp(max=cache.max_len - 1)  # a full row's write lands on masked garbage
        for step in model.plan:
            blk = model.blocks[step.block]
            lora = blk._lora(step.lora)
            x = blk.attn_norm(h, _norm_offset(lora, "attn"))
            h = h + self._attention(blk.attn, x, cos, sin, mask, rows, col, step.kv_slot, lora)
            h = h + blk.mlp(blk.mlp_norm(h, _norm_offset(lora, "mlp")), lora)
        return model.logits(h[:, 0])  # (B, V)

    def _attention(self, attn, x, cos, sin, mask, rows, col, slot, lora) -> Tensor:
        B = x.shape[0]
        q, k, v = attn.qkv(x, cos, sin, lora)  # (B, H, 1, D), (B, Hkv, 1, D) x 2
        kb, vb = self.cache.k[slot], self.cache.v[slot]  # (B_max, Hkv, W, D)
        kb[rows, :, col] = k[:, :, 0]
        vb[rows, :, col] = v[:, :, 0]
        y = F.scaled_dot_product_attention(
            q, kb[:B], vb[:B], attn_mask=mask, enable_gqa=attn.n_kv_heads != attn.n_heads
        )  # (B, H, 1, D)
        y = y.transpose(1, 2).reshape(B, 1, attn.q_dim)
        out = attn.wo(y)
        _add_bias(out, lora, "o")
        _add_lora(out, lora, "o", y, 0, out.shape[-1])
        return out
