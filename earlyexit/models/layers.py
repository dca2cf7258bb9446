"""Llama-family building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, Block.

- Numerics follow Hugging Face ``modeling_llama`` exactly (RMSNorm in fp32 then cast back,
  ``rotate_half`` RoPE with cos/sin computed in fp32), so parity with ``transformers`` holds
  to float rounding; see ``tests/test_hf.py``.
- q/k/v and gate/up are fused into one linear each (``wqkv``, ``w13``): fewer kernel launches
  per decode step. The Hugging Face key map splits and joins them.
- Attention projects q, k, v and hands them to the backend its forward context chose
  (``attention.py``: SDPA, the compiled decode kernel, or a depth-wise path), which appends
  to the KV cache (``kv_cache.py``) and attends. Nothing here makes a policy decision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit.config import ModelConfig, RopeScaling
from earlyexit.models.attention import ATTEND
from earlyexit.models.kernels import Linear, linear
from earlyexit.models.kv_cache import ForwardContext
from earlyexit.models.lora import LoraBank

Lora = tuple[LoraBank, "int | Tensor"] | None  # a block's LoRA bank and the slot(s) to apply


def _add_lora(out: Tensor, lora: Lora, target: str, x: Tensor, lo: int, hi: int) -> None:
    """out[..., lo:hi] += B A x for ``target``, in place (no-op without LoRA)."""
    if lora is None:
        return
    d = lora[0].delta(target, x, lora[1])
    if d is not None:
        out[..., lo:hi] += d


def _add_bias(out: Tensor, lora: Lora, name: str, lo: int = 0, hi: int | None = None) -> None:
    """out += the step's offset of fused linear ``name``'s bias, columns lo:hi (relaxed
    biases only; otherwise a no-op)."""
    if lora is None:
        return
    off = lora[0].bias_offset(name, lora[1])
    if off is not None:
        out += off[..., lo:hi]


def _norm_offset(lora: Lora, which: str) -> Tensor | None:
    return None if lora is None else lora[0].norm_offset(which, lora[1])


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as HF Llama does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, offset: Tensor | None = None) -> Tensor:
        """``offset``: a relaxed step's offset added to the weight ((d,) or per row (B, 1, d))."""
        if offset is None and x.dtype == torch.float32 and x.device.type == "cpu":
            # one fused op instead of six on the decode hot path (same arithmetic)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        w = self.weight if offset is None else self.weight + offset
        if x.dtype == torch.float32:  # same arithmetic, two fewer dispatches on the hot path
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies (head_dim/2,) in fp32, with optional linear or Llama-3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None or scaling.type == "default":
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (B, 1, T, head_dim) for integer ``positions`` (B, T)."""
    freqs = positions.float()[:, None, :, None] * inv_freq.float()  # (B, 1, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, T, D) by per-position cos/sin (B, 1, T, D)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_dim, self.kv_dim = cfg.q_dim, cfg.kv_dim
        self.wqkv = Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.q_dim, cfg.d_model, bias=cfg.o_bias)

    def write_kv(self, x: Tensor, ctx: ForwardContext, kv_slot: int, lora: Lora = None) -> None:
        """Project ``x`` (B, T, d) to keys and values and append them to the cache only."""
        B, T, _ = x.shape
        w = self.wqkv.weight[self.q_dim :]  # the k and v rows of the fused projection
        b = None if self.wqkv.bias is None else self.wqkv.bias[self.q_dim :]
        kv = linear(x, w, b)  # (B, T, 2 kv_dim)
        _add_bias(kv, lora, "qkv", self.q_dim)
        _add_lora(kv, lora, "k", x, 0, self.kv_dim)
        _add_lora(kv, lora, "v", x, self.kv_dim, 2 * self.kv_dim)
        k = kv[..., : self.kv_dim].view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = kv[..., self.kv_dim :].view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        ctx.cache.append(kv_slot, apply_rope(k, ctx.cos, ctx.sin), v, ctx)

    def _read_only(self, x: Tensor, ctx: ForwardContext, kv_slot: int, lora: Lora) -> Tensor:
        """MoR KV sharing: queries only, attending to the keys and values the first recursion
        wrote into ``kv_slot`` (of every token up to each query's position)."""
        B, T, _ = x.shape
        w = self.wqkv.weight[: self.q_dim]
        b = None if self.wqkv.bias is None else self.wqkv.bias[: self.q_dim]
        q = linear(x, w, b)  # (B, T, q_dim): no K/V projections at all
        _add_bias(q, lora, "qkv", 0, self.q_dim)
        _add_lora(q, lora, "q", x, 0, self.q_dim)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v, mask = ctx.cache.read(kv_slot, ctx)
        else:
            k, v, kpos, kseg, kvalid = ctx.shared[kv_slot]
            mask = kpos[:, None, :] <= ctx.positions[:, :, None]  # (B, T, N)
            if kvalid is not None:  # entries that hold no token of this row (see models/mor.py)
                mask = mask & kvalid[:, None, :]
            if kseg is not None:  # packed documents: only the query's own document
                mask = mask & (kseg[:, None, :] == ctx.segments[:, :, None])
            mask = mask[:, None]  # (B, 1, T, N)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
        )
        y = y.transpose(1, 2).reshape(B, T, self.q_dim)
        out = self.wo(y)
        _add_bias(out, lora, "o")
        _add_lora(out, lora, "o", y, 0, out.shape[-1])
        return out

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor, lora: Lora = None):
        """Queries (B, H, T, D), rotated keys and values (B, Hkv, T, D) of ``x`` (B, T, d)."""
        B, T, _ = x.shape
        qkv = self.wqkv(x)  # (B, T, q_dim + 2 kv_dim)
        if lora is not None:
            _add_bias(qkv, lora, "qkv")
            q_end, k_end = self.q_dim, self.q_dim + self.kv_dim
            _add_lora(qkv, lora, "q", x, 0, q_end)
            _add_lora(qkv, lora, "k", x, q_end, k_end)
            _add_lora(qkv, lora, "v", x, k_end, k_end + self.kv_dim)
        n_qk = self.n_heads + self.n_kv_heads
        # q and k heads are rotated together: one RoPE application instead of two.
        # (Slicing rather than .split(): this runs once per layer per token.)
        qk = qkv[..., : n_qk * self.head_dim].view(B, T, n_qk, self.head_dim).transpose(1, 2)
        qk = apply_rope(qk, cos, sin)  # (B, H + Hkv, T, D)
        v = qkv[..., n_qk * self.head_dim :].view(B, T, self.n_kv_heads, self.head_dim)
        return qk[:, : self.n_heads], qk[:, self.n_heads :], v.transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        ctx: ForwardContext,
        kv_slot: int,
        lora: Lora = None,
        read_only: bool = False,
    ) -> Tensor:
        """Attend through the backend ``ctx`` chose once for the whole forward
        (``attention.py``), appending this step's keys and values to ``kv_slot``."""
        if read_only:
            return self._read_only(x, ctx, kv_slot, lora)
        B, T, _ = x.shape
        q, k, v = self.qkv(x, ctx.cos, ctx.sin, lora)
        y = ATTEND[ctx.backend](q, k, v, ctx, kv_slot, self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.q_dim)  # (B, T, H*D)
        out = self.wo(y)
        _add_bias(out, lora, "o")
        _add_lora(out, lora, "o", y, 0, out.shape[-1])
        return out


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_ff = cfg.d_ff
        self.w13 = Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.mlp_bias)  # [gate; up]
        self.w2 = Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, lora: Lora = None) -> Tensor:
        gu = self.w13(x)  # (B, T, 2 d_ff)
        _add_bias(gu, lora, "w13")
        _add_lora(gu, lora, "gate", x, 0, self.d_ff)
        _add_lora(gu, lora, "up", x, self.d_ff, 2 * self.d_ff)
        z = F.silu(gu[..., : self.d_ff]) * gu[..., self.d_ff :]
        out = self.w2(z)
        _add_bias(out, lora, "w2")
        _add_lora(out, lora, "down", z, 0, out.shape[-1])
        return out


class Block(nn.Module):
    """Pre-norm transformer layer. A shared block is run by several steps of the plan."""

    def __init__(self, cfg: ModelConfig, lora_slots: int = 0) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # one LoRA slot per step that runs this block (relaxed recursive models only)
        self.lora = LoraBank(cfg, lora_slots) if lora_slots else None

    def _lora(self, slot: int | Tensor | None) -> Lora:
        return None if slot is None or self.lora is None else (self.lora, slot)

    def forward(
        self,
        h: Tensor,
        ctx: ForwardContext,
        kv_slot: int,
        lora_slot: int | Tensor | None = None,
        read_only: bool = False,
    ) -> Tensor:
        """``lora_slot``: this step's LoRA slot, or per-row slots (B,) for mixed-depth rows;
        ``read_only``: attend to ``kv_slot`` without writing it (MoR KV sharing)."""
        lora = self._lora(lora_slot)
        h = h + self.attn(
            self.attn_norm(h, _norm_offset(lora, "attn")), ctx, kv_slot, lora, read_only
        )
        return h + self.mlp(self.mlp_norm(h, _norm_offset(lora, "mlp")), lora)

    def write_kv(
        self, h: Tensor, ctx: ForwardContext, kv_slot: int, lora_slot: int | Tensor | None = None
    ) -> None:
        """Cache the keys and values this block would write for ``h``; skip the rest."""
        lora = self._lora(lora_slot)
        self.attn.write_kv(self.attn_norm(h, _norm_offset(lora, "attn")), ctx, kv_slot, lora)


class ExitAdapter(nn.Module):
    """A residual low-rank MLP on an exit's hidden state: h + U silu(D h), U zero-initialised
    (the exit starts as it was). It gives a shallow exit capacity of its own without touching
    the blocks that deeper tokens share."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = Linear(d_model, rank, bias=False)
        self.up = Linear(rank, d_model, bias=False)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.down.weight, 0.0, self.down.in_features**-0.5, generator=generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.silu(self.down(h)))


class ExitAttention(nn.Module):
    """An exit's attention adapter (Kangaroo, arXiv 2404.18911): h + Attention(RMSNorm(h)),
    one pre-norm grouped-query attention layer with no MLP, its own q/k/v/o and its own KV
    slot. Where a per-token adapter sees one state, this one attends over the exit's states
    at every earlier position, which is what a shallow draft lacks most.

    ``reset_parameters`` zero-initialises the output projection (the exit starts as it was);
    draft training (``training/draft.py``) starts instead from the attention of the block
    that follows the exit, which is what the full model runs next on the same states."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        w = self.attn.wqkv.weight
        nn.init.normal_(w, 0.0, w.shape[1] ** -0.5, generator=generator)
        nn.init.zeros_(self.attn.wo.weight)
        for b in (self.attn.wqkv.bias, self.attn.wo.bias):
            if b is not None:
                nn.init.zeros_(b)
        nn.init.ones_(self.norm.weight)

    def forward(self, h: Tensor, ctx: ForwardContext, kv_slot: int) -> Tensor:
        """``h`` (B, T, d) at the exit -> (B, T, d); appends its K/V to ``kv_slot`` when
        ``ctx`` has a cache (so every position it will attend to must pass through it)."""
        return h + self.attn(self.norm(h), ctx, kv_slot)

    def write_kv(self, h: Tensor, ctx: ForwardContext, kv_slot: int) -> None:
        """Append the keys and values ``forward`` would for ``h``, computing nothing else."""
        self.attn.write_kv(self.norm(h), ctx, kv_slot)


class ExitClassifier(nn.Module):
    """Learned exit confidence: MLP d -> d -> 2 on the exit's normed state; class 1 means
    "this exit's argmax equals the final argmax" (CALM's classifier, FREE's ``meta``)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc1 = Linear(d_model, d_model)
        self.fc2 = Linear(d_model, 2)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, 0.0, fc.in_features**-0.5, generator=generator)
            nn.init.zeros_(fc.bias)

    def forward(self, h_normed: Tensor) -> Tensor:
        """Logits (..., 2): disagree, agree."""
        return self.fc2(F.relu(self.fc1(h_normed)))
