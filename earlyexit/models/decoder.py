"""The one decoder class: ``embed -> run_step(s) -> logits`` over any depth plan.

- ``Decoder`` holds the unique blocks; the plan (``config.plan``) says which block each step
  runs. Dense models have one step per block; recursive and MoR models reuse blocks.
- Pure compute. Which rows run which steps, when to exit and what to sample are decided by
  ``decoding/`` and ``engine/``; they call :meth:`embed`, :meth:`run_steps` and
  :meth:`logits` directly. :meth:`forward` is the full-depth convenience path.
- Every exit reuses the final norm and head through :meth:`logits` (FREE/CALM/RRT all do), so
  a dense export stays a plain Hugging Face model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from earlyexit.config import ModelConfig
from earlyexit.models import attention
from earlyexit.models.heads import PrunedHead
from earlyexit.models.kernels import Linear, linear
from earlyexit.models.kv_cache import ForwardContext, KVCache
from earlyexit.models.layers import (
    Block,
    ExitAdapter,
    ExitAttention,
    ExitClassifier,
    RMSNorm,
    rope_cos_sin,
    rope_inv_freq,
)
from earlyexit.models.mor import MoROutput, mor_forward
from earlyexit.models.routers import Routers


@dataclass
class ExitOutput:
    """Everything exit training needs from one forward.

    Attributes:
        hidden: output of every step, n_steps x (B, T, d) (pre-norm residual stream).
        normed: the same after the final norm (FREE's layer-wise distillation targets).
        exit_logits: logits at each exit point (``config.exit_points``), last = final.
        classifier_logits: (B, T, 2) per intermediate exit, when the model has classifiers.
    """

    hidden: list[Tensor]
    normed: list[Tensor]
    exit_logits: list[Tensor]
    classifier_logits: list[Tensor] | None = None


class Decoder(nn.Module):
    """A decoder-only transformer whose depth is a plan of steps over shared blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.plan = config.plan
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        slots = [
            sum(s.block == b and s.lora is not None for s in config.plan)
            for b in range(config.n_blocks)
        ]
        self.blocks = nn.ModuleList(Block(config, slots[b]) for b in range(config.n_blocks))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        ex = config.exits
        # Optional per-exit norms and confidence classifiers, one per intermediate exit.
        self.exit_norms = (
            nn.ModuleList(RMSNorm(config.d_model, config.norm_eps) for _ in ex.steps)
            if ex.norms
            else None
        )
        self.exit_classifiers = (
            nn.ModuleList(ExitClassifier(config.d_model) for _ in ex.steps)
            if ex.classifier
            else None
        )
        self.exit_adapters = (
            nn.ModuleList(ExitAdapter(config.d_model, ex.adapter_rank) for _ in ex.steps)
            if ex.adapter_rank
            else None
        )
        self.exit_attention = (
            nn.ModuleList(ExitAttention(config) for _ in ex.steps) if ex.attention else None
        )
        self.head = (
            None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        )
        # Mixture-of-Recursions routers (per-token recursion depth), when configured
        self.routers = Routers(config) if config.router.kind != "none" else None
        self._stash_slots = frozenset(s.kv_slot for s in config.plan if s.shares_kv)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._doc_segments: Tensor | None = None  # set by documents()
        self.draft = None  # a DraftSpec when a draft file is attached (earlyexit/drafts.py)

    # ------------------------------------------------------------------ init
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) linears and embedding, zero biases, unit norms (HF Llama init)."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for m in [
            *(self.exit_classifiers or ()),
            *(self.exit_adapters or ()),
            *(self.exit_attention or ()),
        ]:
            m.reset_parameters(generator)
        for b in self.blocks:
            if b.lora is not None:
                b.lora.reset_parameters(generator)
        if self.routers is not None:
            self.routers.reset_parameters(generator)
        self.rebuild_buffers(self.tok_embeddings.weight.device)

    @contextlib.contextmanager
    def documents(self, segments: Tensor | None):
        """Within this block, uncached forwards attend only within each token's document
        (``segments`` (B, T), e.g. from :func:`earlyexit.training.data.document_segments`).
        The training loop uses it so that every objective's forward, DDP-wrapped or not,
        gets the mask without each objective passing it on."""
        before, self._doc_segments = self._doc_segments, segments
        try:
            yield
        finally:
            self._doc_segments = before

    def rebuild_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers (RoPE inverse frequencies) on ``device``."""
        cfg = self.config
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)

    # ------------------------------------------------------------------ pieces
    @property
    def n_steps(self) -> int:
        return len(self.plan)

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, T) -> hidden states (B, T, d_model)."""
        return self.tok_embeddings(tokens)

    def context(
        self,
        positions: Tensor,
        cache: KVCache | None = None,
        rows: np.ndarray | list[int] | None = None,
        n_new: np.ndarray | list[int] | None = None,
        kv_slots: np.ndarray | list[int] | None = None,
        segments: Tensor | None = None,
    ) -> ForwardContext:
        """Per-forward state shared by every step: RoPE tables, cache, rows and valid counts,
        and the attention backend every step uses (``attention.choose``, decided here once).

        Args:
            positions: RoPE positions (B, T).
            cache: KV cache to read and append to, or None for an uncached forward.
            rows: cache rows of the B batch rows (default 0..B-1).
            n_new: valid tokens per row (default T); the rest is right padding.
            kv_slots: per-row KV slots for :meth:`run_block` on rows at different steps.
            segments: document index per token (B, T), uncached forwards over packed
                documents only: attention stays within each document.
        """
        dtype = self.tok_embeddings.weight.dtype
        cos, sin = rope_cos_sin(self.inv_freq, positions, dtype)
        ctx = ForwardContext(
            positions=positions,
            cos=cos,
            sin=sin,
            cache=cache,
            rows=None if rows is None else np.asarray(rows, dtype=np.int64),
            n_new=None if n_new is None else np.asarray(n_new, dtype=np.int64),
            sliding_window=self.config.sliding_window,
            kv_slots=None if kv_slots is None else np.asarray(kv_slots, dtype=np.int64),
            stash_slots=self._stash_slots,
            segments=segments,
        )
        ctx.backend = attention.choose(ctx)  # how every attention call of this forward runs
        return ctx

    def run_step(self, i: int, h: Tensor, ctx: ForwardContext) -> Tensor:
        """Run step ``i`` of the plan on hidden states (B, T, d_model)."""
        step = self.plan[i]
        return self.blocks[step.block](h, ctx, step.kv_slot, step.lora, step.shares_kv)

    def run_steps(self, start: int, stop: int, h: Tensor, ctx: ForwardContext) -> Tensor:
        """Run steps ``start .. stop-1`` in order (the common fused range)."""
        for i in range(start, stop):
            step = self.plan[i]
            h = self.blocks[step.block](h, ctx, step.kv_slot, step.lora, step.shares_kv)
        return h

    def run_block(
        self,
        block: int,
        h: Tensor,
        ctx: ForwardContext,
        kv_slot: int = -1,
        lora_slots: Tensor | None = None,
    ) -> Tensor:
        """Run shared ``block`` on rows that may be at different steps of it (depth-wise
        batching): each row writes its own KV slot (``ctx.kv_slots``, else ``kv_slot``) and
        applies its own LoRA slot ``lora_slots`` (B,), all in one call."""
        return self.blocks[block](h, ctx, kv_slot, lora_slots)

    def head_weight(self) -> Tensor:
        return self.tok_embeddings.weight if self.head is None else self.head.weight

    def logits(self, h: Tensor) -> Tensor:
        """Final norm + LM head: (..., d_model) -> (..., vocab). Every exit uses this."""
        return linear(self.norm(h), self.head_weight())

    # ------------------------------------------------------------------ exits
    def exit_index(self, step: int) -> int | None:
        """Index of the intermediate exit after ``step`` steps (None otherwise)."""
        steps = self.config.exits.steps
        return steps.index(step) if step in steps else None

    def exit_norm(self, h: Tensor, step: int, ctx: ForwardContext | None = None) -> Tensor:
        """What the exit after ``step`` steps reads: its adapters (if any), then its own norm
        or the final norm.

        An exit with an attention adapter needs ``ctx``, the forward context ``h`` (B, T, d)
        was computed in: the adapter attends over (and, with a cache, appends to) its own KV
        slot at those positions."""
        i = self.exit_index(step)
        if i is not None and self.exit_attention is not None:
            if ctx is None:
                raise ValueError(
                    f"the exit after step {step} has an attention adapter: it needs the "
                    "forward context (positions and cache) of the states it reads"
                )
            if h.dim() == 2:  # (B, d): one position per row
                h = self.exit_attention[i](h[:, None], ctx, self.config.exit_kv_slot(i))[:, 0]
            else:
                h = self.exit_attention[i](h, ctx, self.config.exit_kv_slot(i))
        if i is not None and self.exit_adapters is not None:
            h = self.exit_adapters[i](h)
        if i is not None and self.exit_norms is not None:
            return self.exit_norms[i](h)
        return self.norm(h)

    def exit_context(
        self, step: int, cache: KVCache, rows: np.ndarray | list[int] | None = None, n_new=None
    ) -> tuple[ForwardContext, int] | None:
        """The context of each row's next position in the KV slot of the attention adapter
        of the exit after ``step``, and that slot; None if that exit has none. (While drafting
        the deep slots lag behind, so only the adapter's own slot knows the position.)
        ``rows``: cache rows (None: all of them)."""
        i = self.exit_index(step)
        if i is None or self.exit_attention is None:
            return None
        slot = self.config.exit_kv_slot(i)
        r = np.arange(cache.batch_size) if rows is None else np.asarray(rows)
        dev = self.tok_embeddings.weight.device
        positions = torch.as_tensor(cache.lengths[slot, r], device=dev)[:, None]  # (B, 1)
        return self.context(positions, cache, rows=rows, n_new=n_new), slot

    def run_filling_exits(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        """Every step on ``h`` (B, T, d), appending each attention exit's keys and values on
        the way (a prefill whose tokens later drafts attend over)."""
        done = 0
        if self.exit_attention is not None:
            for step in self.config.exits.steps:
                h, done = self.run_steps(done, step, h, ctx), step
                self.exit_norm(h, step, ctx)  # appends these positions to the adapter's slot
        return self.run_steps(done, self.n_steps, h, ctx)

    def exit_logits(
        self,
        h: Tensor,
        step: int,
        pruned: PrunedHead | None = None,
        ctx: ForwardContext | None = None,
    ) -> Tensor:
        """Logits (..., V) of the exit after ``step`` steps: its norm + the shared LM head, or
        with ``pruned`` the head over that token subset only (-inf elsewhere; ``heads.py``).
        ``ctx``: see :meth:`exit_norm` (exits with an attention adapter)."""
        if pruned is not None:
            return pruned.full_logits(self, self.exit_norm(h, step, ctx))
        return linear(self.exit_norm(h, step, ctx), self.head_weight())

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None) -> list[Tensor]:
        """Uncached forward returning every step's output: n_steps tensors (B, T, d)."""
        if positions is None:
            positions = self.default_positions(tokens.shape, None)
        ctx = self.context(positions)
        h, out = self.embed(tokens), []
        for i in range(self.n_steps):
            h = self.run_step(i, h, ctx)
            out.append(h)
        return out

    def kv_only_step(self, i: int, h: Tensor, ctx: ForwardContext) -> None:
        """Write step ``i``'s keys and values for ``h`` without running the rest of its block
        (CALM's state propagation: an exited token's state stands in for skipped layers)."""
        step = self.plan[i]
        self.blocks[step.block].write_kv(h, ctx, step.kv_slot, step.lora)

    # ------------------------------------------------------------------ full depth
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        rows: np.ndarray | list[int] | None = None,
        n_new: np.ndarray | list[int] | None = None,
        *,
        exits: bool = False,
        routing: str | None = None,
        return_routing: bool = False,
        segments: Tensor | None = None,
    ) -> Tensor | ExitOutput | MoROutput:
        """Full-depth logits (B, T, vocab) for ``tokens`` (B, T).

        Without ``positions``, positions continue from the cache (row-wise) or start at 0.
        With ``exits=True`` returns an :class:`ExitOutput` instead (training objectives use
        it: going through ``forward`` keeps DDP and FSDP hooks in the loop). MoR models
        route each token (``routing``: ``causal`` by default, ``train`` for top-k) and
        return a :class:`MoROutput` with ``return_routing=True``.

        ``segments`` (B, T): document index per token, for training on packed documents
        (uncached only); inside :meth:`documents` it defaults to that block's segments.
        """
        if positions is None:
            positions = self.default_positions(tokens.shape, cache, rows)
        if segments is None and cache is None:
            segments = self._doc_segments
        if segments is not None and cache is not None:
            raise ValueError("document segments apply to uncached forwards only")
        if self.routers is not None:  # MoR: the router decides each token's recursions
            out = mor_forward(
                self, tokens, routing or "causal", positions, cache, rows, n_new, segments
            )
            return out if return_routing else out.logits
        ctx = self.context(positions, cache, rows, n_new, segments=segments)
        if not exits:
            return self.logits(self.run_steps(0, self.n_steps, self.embed(tokens), ctx))
        h, hidden = self.embed(tokens), []
        for i in range(self.n_steps):
            h = self.run_step(i, h, ctx)
            hidden.append(h)
        points = self.config.exit_points
        exit_logits = [self.exit_logits(hidden[s - 1], s, ctx=ctx) for s in points]
        cls = None
        if self.exit_classifiers is not None:
            cls = [
                c(self.exit_norm(hidden[s - 1], s, ctx))
                for c, s in zip(self.exit_classifiers, points)
            ]
        return ExitOutput(hidden, [self.norm(x) for x in hidden], exit_logits, cls)

    def default_positions(self, shape: torch.Size, cache: KVCache | None, rows=None) -> Tensor:
        """Positions continuing each row's first KV slot, or 0..T-1 without a cache."""
        B, T = shape
        dev = self.tok_embeddings.weight.device
        t = torch.arange(T, device=dev)[None, :]
        if cache is None:
            return t.expand(B, T)
        r = np.arange(B) if rows is None else np.asarray(rows)
        start = torch.as_tensor(cache.lengths[self.plan[0].kv_slot, r], device=dev)[:, None]
        return start + t
