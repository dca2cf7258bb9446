"""KV cache with per-(slot, row) lengths, and the per-forward context that attention reads.

- One preallocated key and value buffer per KV slot (``plan.py``), each (B, Hkv, S, D).
- Lengths are kept per (slot, row) on the host: rows of one batch may hold prompts of
  different lengths, and slots may hold different numbers of tokens (a FREE deep slot lags
  its shallow slots; a MoR recursion caches only the tokens routed to it). Keeping them on
  the host means building indices and masks never waits on the device.
- A forward appends ``T`` entries per row at each slot it runs, at indices
  ``length .. length+T-1``; only the first ``n_new[row]`` count (right padding for ragged
  prompts), so padding is overwritten by the next write and never attended to.
- Causality is by cache index (entries are appended in position order in every plan we run);
  the sliding window is by RoPE position, which the cache stores per entry (only for models
  with a window: nothing else reads it).

Every call is planned by one planner (``_Plan``): where each row's new entries go, whether
the cache has room (the one "KV cache full" error), and, built when an attention path first
asks, the indices and masks it reads. A plan is a pure function of (each row's slot relative
to the call's lowest, rows, lengths, new tokens per row, T) and is kept (``_plans``, a few
recent entries): every step of a forward whose slot has the same lengths shares it (a dense
forward builds one mask, not one per layer), and so does the next call of the same rows at
the same lengths (a depth-wise call on the next shared block). What depends on the forward
alone (its rows, slots and new tokens, checked) is worked out once per forward context.

The cache also carries what its forwards attend with: ``kernel``, the compiled decode kernel
(``decode_kernel.py``; ``for_model`` loads it for a CPU fp32 cache), and ``attention``, what
it asks for; ``attention.py`` chooses the path once per forward context from both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from earlyexit.errors import InputError
from earlyexit.models import decode_kernel, kernels


@dataclass
class ForwardContext:
    """Everything a step needs besides its hidden states; built once per forward.

    Attributes:
        positions: RoPE positions (B, T), int64, on the model's device.
        cos, sin: RoPE tables for ``positions`` (B, 1, T, head_dim) in the compute dtype.
        cache: the KV cache, or None for an uncached forward.
        rows: host int array (B,) of cache rows this batch occupies (None: rows 0..B-1).
        n_new: host int array (B,) of valid new tokens per row (None: all T).
        sliding_window: attend only to the last ``sliding_window`` positions, or None.
        kv_slots: host int array (B,): each row's own KV slot, overriding the step's
            (rows at different steps of one shared block); None: the step's slot.
        stash_slots: KV slots later steps read without writing (MoR KV sharing): their keys,
            values and positions are kept in ``shared`` during an uncached forward, and their
            entries' positions are recorded in the cache.
        segments: document index of every token (B, T) for an uncached forward over packed
            documents: a token attends only within its own document (None: no such mask).
        backend: how every attention call of this forward attends (``attention.py``), chosen
            once by ``Decoder.context``.
    """

    positions: Tensor
    cos: Tensor
    sin: Tensor
    cache: KVCache | None = None
    rows: np.ndarray | None = None
    n_new: np.ndarray | None = None
    sliding_window: int | None = None
    kv_slots: np.ndarray | None = None
    stash_slots: frozenset = frozenset()
    segments: Tensor | None = None
    backend: str | None = None
    shared: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    def uncached_mask(self) -> Tensor | None:
        """Mask for an uncached forward: causal by index, within the sliding window and the
        token's own document when those apply (None means plain ``is_causal``)."""
        if self.sliding_window is None and self.segments is None:
            return None
        if "uncached" not in self._memo:
            T = self.positions.shape[1]
            mask = torch.ones(T, T, dtype=torch.bool, device=self.positions.device).tril()[None]
            if self.sliding_window is not None:
                qpos = self.positions[:, :, None]  # (B, T, 1)
                kpos = self.positions[:, None, :]  # (B, 1, T)
                mask = mask & (qpos - kpos < self.sliding_window)
            if self.segments is not None:
                mask = mask & (self.segments[:, :, None] == self.segments[:, None, :])
            self._memo["uncached"] = mask[:, None]  # (B, 1, T, T)
        return self._memo["uncached"]


# Plans kept across calls (``_plan``): a hit is the same rows at the same lengths at another
# step of the forward or moving on to the next block, so only the last few are ever reused.
PLAN_CACHE = 32


class KVCache:
    """Preallocated keys and values for every KV slot of a plan.

    Args:
        n_slots: number of KV slots (``ModelConfig.n_kv_slots``).
        batch_size: rows.
        max_len: entries per (slot, row).
        n_kv_heads, head_dim: attention shape.
        device, dtype: buffer placement.
        kernel: the decode kernel its forwards may use (``decode_kernel.load()``), or None.
        attention: what its forwards ask for (``attention.REQUESTS``): ``auto``; ``sdpa``
            (never the kernel); ``kernel`` (or an error); ``per-slot``, ``per-row``,
            ``gather`` (the path of depth-wise calls).
    """

    def __init__(
        self,
        n_slots: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernel: decode_kernel.Kernel | None = None,
        attention: str = "auto",
    ) -> None:
        shape = (n_slots, batch_size, n_kv_heads, max_len, head_dim)
        # One tensor per k / v so that rows at different steps (different slots) can be
        # written and read in one call; self.k[slot] etc. are views of one slot.
        self.k_all = torch.zeros(shape, device=device, dtype=dtype)
        self.v_all = torch.zeros(shape, device=device, dtype=dtype)
        # RoPE position of every entry (only read for sliding-window masks and KV sharing).
        self.pos_all = torch.zeros(n_slots, batch_size, max_len, device=device, dtype=torch.long)
        self.k, self.v, self.pos = list(self.k_all), list(self.v_all), list(self.pos_all)
        self._plans: dict = {}  # _Plan by (rows, slots, new tokens, T, lengths)
        self.lengths = np.zeros((n_slots, batch_size), dtype=np.int64)  # host-side
        self.batch_size, self.max_len, self.n_slots = batch_size, max_len, n_slots
        self.device = torch.device(device)
        self.kernel, self.attention = kernel, attention

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, attention: str = "auto") -> KVCache:
        """A cache sized for ``model`` (a ``Decoder``), on its device and dtype. A CPU fp32
        cache gets the decode kernel (built here on a machine's first call, never inside a
        forward) unless ``attention`` is ``sdpa``, and the linear kernels are chosen here
        (``kernels.prepare_decoding``)."""
        cfg = model.config
        p = model.tok_embeddings.weight
        kernel = None
        if attention != "sdpa" and p.device.type == "cpu" and p.dtype == torch.float32:
            kernel = decode_kernel.load()
        # the linear kernel per row count, likewise (measured once per machine)
        kernels.prepare_decoding(p.device, p.dtype, kernels.linear_shapes(model))
        shape = (cfg.n_kv_slots, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
        return cls(*shape, p.device, p.dtype, kernel, attention)

    def reset(self, rows: np.ndarray | list[int] | None = None) -> None:
        """Forget the contents of ``rows`` (all rows by default) in every slot."""
        if rows is None:
            self.lengths[:] = 0
        else:
            self.lengths[:, np.asarray(rows)] = 0

    def nbytes(self) -> int:
        return 2 * self.k_all.numel() * self.k_all.element_size()

    # ------------------------------------------------------------------ the hot path
    # Every entry point appends each row's ``ctx.n_new`` (default T) new entries, at the
    # step's ``slot`` or at its own ``ctx.kv_slots[b]``, and differs only in what it reads.
    def update(
        self, slot: int, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append ``k``, ``v`` (B, Hkv, T, D) for ``ctx.rows`` at ``slot``; return what to attend.

        Returns:
            keys and values (B, Hkv, W, D) covering every valid entry of these rows (views of
            the slot for contiguous rows; gathered from each row's own slot when the rows are
            at different slots), and a boolean mask (B or 1, 1, T, W), or None when every
            query may see every key.
        """
        plan, call, base = self._write(slot, k, v, ctx)
        W = plan.W
        if call.slots is None:
            sel = plan.row_sel
            keys, vals = self.k[base][sel, :, :W], self.v[base][sel, :, :W]
            kpos = self.pos[base][sel, :W] if ctx.sliding_window is not None else None
        else:  # each row's (slot, row) block, gathered into one batch
            idx = plan.blocks_t + base * self.batch_size if base else plan.blocks_t
            keys = self.k_all.flatten(0, 1)[idx, :, :W]
            vals = self.v_all.flatten(0, 1)[idx, :, :W]
            kpos = self.pos_all.flatten(0, 1)[idx, :W] if ctx.sliding_window is not None else None
        mask = plan.mask
        if kpos is not None:
            mask = _window(mask, kpos, ctx)
        return keys, vals, mask

    def append(self, slot: int, k: Tensor, v: Tensor, ctx: ForwardContext) -> None:
        """Append ``k``, ``v`` (B, Hkv, T, D) as ``update`` does, reading nothing back (CALM's
        state propagation writes K/V only: no view or gather of the history is built)."""
        self._write(slot, k, v, ctx)

    def update_slots(
        self, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Rows at different KV slots (``ctx.kv_slots``, depth-wise batching): each row
        appends ``k``, ``v`` (B, Hkv, T, D) to its own slot. Returns, per distinct slot, what
        *every* row of the call would attend to there: keys and values (B, Hkv, W, D) that
        are views of the slot when the rows are contiguous (never a copy of each row's
        history out of its own slot), a mask (B, 1, T, W), and which rows (B,) bool are
        that slot's. Attention then runs once per slot and each row keeps its own slot's
        output: one extra attention pass per extra slot instead of a gather of every row's
        keys and values (measured: BENCHMARKS.md, ``depthwise --calls``)."""
        plan, _, base = self._write(-1, k, v, ctx)
        sel = plan.row_sel
        out = []
        for rel, W, mask, member in plan.groups:
            s = base + rel
            if ctx.sliding_window is not None:
                mask = _window(mask, self.pos[s][sel, :W], ctx)
            out.append((self.k[s][sel, :, :W], self.v[s][sel, :, :W], mask, member))
        return out

    def update_rows(
        self, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> list[tuple[int, int, Tensor, Tensor, Tensor | None]]:
        """Rows at different KV slots, attended row by row: each row appends ``k``, ``v``
        (B, Hkv, T, D) to its own slot (as ``update_slots``) and gets a view of exactly its
        own history there. Returns per row (batch index b, valid new tokens n, keys and
        values (1, Hkv, W_b, D), a causal mask (1, 1, n, W_b) or None when n == 1).

        One attention call per row reads each history once (a single pass, no copy), at
        a fixed launch cost per row; ``update_slots`` instead reads every row's history once
        per distinct slot of the call. Which is cheaper depends on the histories' length
        (``attention.choose``). Not for sliding windows or KV sharing."""
        if ctx.sliding_window is not None or ctx.stash_slots:
            raise ValueError("row-by-row attention does not apply to windows or KV sharing")
        plan, _, base = self._write(-1, k, v, ctx)
        kb, vb = self.k, self.v
        return [
            (b, n, kb[base + s][r : r + 1, :, :W], vb[base + s][r : r + 1, :, :W], mask)
            for b, n, s, r, W, mask in plan.per_row
        ]

    def reserve(
        self, slot: int, B: int, T: int, ctx: ForwardContext
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reserve each row's new entries for the decode kernel, which writes them and
        attends in one pass (``decode_kernel.Kernel.append_attend``): each of the B rows at
        its own slot (``ctx.kv_slots``) or at ``slot``, ``ctx.n_new`` (default T) entries
        each. Returns each row's (slot, row) block (``slot * batch + row``), its entries
        before the append and its new entries, (B,) host int64 each; the plan has checked
        them all (the kernel writes raw memory: no index may wrap around or run past)."""
        plan, call, base = self._plan(slot, B, T, ctx)
        self._advance(call, base, plan)
        return plan.blocks + base * self.batch_size, plan.lens, plan.n_new

    def read(self, slot: int, ctx: ForwardContext) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values (B, Hkv, W, D) of ``slot`` for ``ctx.rows`` without appending, and a
        mask letting each query see the entries at positions up to its own (KV sharing)."""
        B = ctx.positions.shape[0]
        rows = np.arange(B) if ctx.rows is None else ctx.rows
        lens = self.lengths[slot, rows]
        W = max(int(lens.max()), 1)
        if rows[0] >= 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + B)):
            sel = slice(int(rows[0]), int(rows[0]) + B)
        else:
            sel = torch.as_tensor(rows, device=self.device)
        k, v, kpos = self.k[slot][sel, :, :W], self.v[slot][sel, :, :W], self.pos[slot][sel, :W]
        j = torch.arange(W, device=self.device)[None, None, :]
        valid = j < torch.as_tensor(lens, device=self.device)[:, None, None]
        mask = valid & (kpos[:, None, :] <= ctx.positions[:, :, None])  # (B, T, W)
        return k, v, mask[:, None]

    # ------------------------------------------------------------------ the planner
    def _plan(self, slot: int, B: int, T: int, ctx: ForwardContext) -> tuple[_Plan, _Call, int]:
        """The call's plan, its forward's rows (``_Call``) and its base slot (the step's
        slot, or the lowest of the rows' own)."""
        call = ctx._memo.get("kv")
        if call is None or call.B != B or call.T != T:
            call = ctx._memo["kv"] = _Call(self, ctx, B, T)
        if call.slots is None:
            if not 0 <= slot < self.n_slots:
                raise IndexError(f"KV slot {slot} out of range")
            base, lens = slot, self.lengths[slot, call.index]
        else:
            base, lens = call.base, self.lengths[call.slots, call.rows]
        key = (call.key, lens.tobytes())
        plan = self._plans.get(key)  # every step of a forward, and later calls alike
        if plan is None:
            if len(self._plans) >= PLAN_CACHE:  # a long-lived server sees many shapes
                self._plans.clear()
            plan = self._plans[key] = _Plan(self, call, lens.copy())
        return plan, call, base

    def _advance(self, call: _Call, base: int, plan: _Plan) -> None:
        if call.slots is None:
            self.lengths[base, call.index] = plan.after
        else:
            self.lengths[call.slots, call.rows] = plan.after

    def _write(self, slot: int, k: Tensor, v: Tensor, ctx: ForwardContext):
        """Append each row's valid new entries of ``k``, ``v`` (B, Hkv, T, D); padding never
        lands in the cache. Returns what ``_plan`` does."""
        B, _, T, _ = k.shape
        plan, call, base = self._plan(slot, B, T, ctx)
        # positions are read for windows and KV-sharing slots only
        keep_pos = call.keep_pos or (call.slots is None and base in ctx.stash_slots)
        if plan.slice is not None:  # every row writes T entries at the same columns
            rows, cols = plan.slice
            self.k[base][rows, :, cols] = k
            self.v[base][rows, :, cols] = v
            if keep_pos:
                self.pos[base][rows, cols] = ctx.positions
        else:
            blocks, cols, b, t = plan.writes
            if call.slots is None:  # rows of the step's slot
                kb, vb, pb = self.k[base], self.v[base], self.pos[base]
            else:  # (slot * batch + row)-indexed views: each row's own slot in one scatter
                kb, vb, pb = self.k_all.flatten(0, 1), self.v_all.flatten(0, 1), None
                if base:
                    blocks = blocks + base * self.batch_size
            if plan.single:  # one entry per row: the new keys are (B, Hkv, D) as they are
                kb[blocks, :, cols], vb[blocks, :, cols] = k[:, :, 0], v[:, :, 0]
            else:
                kb[blocks, :, cols] = k.transpose(1, 2)[b, t]  # (N, Hkv, D)
                vb[blocks, :, cols] = v.transpose(1, 2)[b, t]
            if keep_pos:
                pb = self.pos_all.flatten(0, 1) if pb is None else pb
                pb[blocks, cols] = ctx.positions[b, t]
        self._advance(call, base, plan)
        return plan, call, base

    def _full(self, entries: int):
        """The one "KV cache full" error (a user's prompt plus its new tokens do not fit)."""
        raise InputError(f"KV cache full: {entries} entries exceed its length {self.max_len}")


class _Call:
    """What one forward context asks of the cache, checked once: every layer of the forward
    shares it (``ctx._memo``)."""

    __slots__ = ("B", "T", "base", "index", "keep_pos", "key", "n_new", "rel", "rows", "slots")

    def __init__(self, cache: KVCache, ctx: ForwardContext, B: int, T: int) -> None:
        rows = np.arange(B) if ctx.rows is None else ctx.rows
        n_new = np.full(B, T, dtype=np.int64) if ctx.n_new is None else ctx.n_new
        slots = ctx.kv_slots
        if rows.min() < 0 or rows.max() >= cache.batch_size:
            raise IndexError(f"cache rows {rows.tolist()} out of range")
        if slots is not None and (slots.min() < 0 or slots.max() >= cache.n_slots):
            raise IndexError(f"KV slots {slots.tolist()} out of range")
        if (n_new < 0).any() or (n_new > T).any():
            raise ValueError(f"n_new must be within [0, {T}], got {n_new}")
        self.B, self.T, self.rows, self.n_new, self.slots = B, T, rows, n_new, slots
        self.index = slice(0, B) if ctx.rows is None else rows  # lengths[slot, index]: rows
        windowed = ctx.sliding_window is not None
        if slots is None:  # every row at the step's slot (given per call)
            self.base, self.rel, self.keep_pos = None, None, windowed
        else:
            # The plan depends on the slots only relative to the lowest one: the same rows
            # moving on to the next shared block (slots + 1, same lengths) reuse it, so
            # consecutive depth-wise calls do not rebuild it.
            self.base = int(slots.min())
            self.rel = slots - self.base
            self.keep_pos = windowed or bool(set(slots.tolist()) & ctx.stash_slots)
        rel = None if self.rel is None else self.rel.tobytes()
        self.key = (rel, rows.tobytes(), n_new.tobytes(), T)


class _Plan:
    """One call's writes and reads, for given rows, slots relative to the call's base, lengths
    and new tokens. Host arithmetic, checked when made; the device indices and masks an
    attention path reads are built the first time it asks (the decode kernel needs none)."""

    def __init__(self, cache: KVCache, call: _Call, lens: np.ndarray) -> None:
        B, T = call.B, call.T
        n_new = call.n_new.copy()
        after = lens + n_new
        if after.max() > cache.max_len:
            cache._full(int(after.max()))
        self.B, self.T, self.lens, self.n_new, self.after = B, T, lens, n_new, after
        self.W = max(int(after.max()), 1)
        self.device, self.batch_size = cache.device, cache.batch_size
        self.rows = call.rows.copy()
        self.rel = np.zeros(B, dtype=np.int64) if call.rel is None else call.rel.copy()
        self.blocks = self.rel * cache.batch_size + self.rows  # (slot - base) x batch + row
        r0 = int(self.rows[0])
        contiguous = r0 >= 0 and np.array_equal(self.rows, np.arange(r0, r0 + B))
        self.rows_slice = slice(r0, r0 + B) if contiguous else None
        uniform = bool((lens == lens[0]).all() and (n_new == T).all())
        self.slice = None  # (rows, columns) when one slice assignment writes the call
        if call.slots is None and contiguous and uniform:
            self.slice = (self.rows_slice, slice(int(lens[0]), int(lens[0]) + T))
        self.single = T == 1 and bool(n_new.all())  # decode: every row appends one entry

    def _t(self, a) -> Tensor:
        return torch.as_tensor(a, device=self.device)

    @cached_property
    def writes(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(slot - base) x batch + row, column, batch and query index of every valid new
        entry, on the device."""
        if self.single:
            b, t = np.arange(self.B), np.zeros(self.B, dtype=np.int64)
        else:
            b, t = np.nonzero(np.arange(self.T)[None, :] < self.n_new[:, None])
        return tuple(self._t(np.stack([self.blocks[b], self.lens[b] + t, b, t])).unbind(0))

    @cached_property
    def row_sel(self) -> slice | Tensor:
        """The rows within one slot: a slice (views) or an index (a gather)."""
        return self.rows_slice if self.rows_slice is not None else self._t(self.rows)

    @cached_property
    def blocks_t(self) -> Tensor:
        return self._t(self.blocks)

    @cached_property
    def mask(self) -> Tensor | None:
        """What each query of one batch read (``update``) sees, (B|1, 1, T, W); None: all."""
        if self.slice is not None:
            if self.T == 1:
                return None
            L = int(self.lens[0])  # causal with an offset of L past entries
            return torch.ones(self.T, self.W, dtype=torch.bool, device=self.device).tril(L)[
                None, None
            ]
        return _causal_mask(self.lens, self.n_new, self.T, self.W, self.device)[:, None]

    @cached_property
    def groups(self) -> list[tuple[int, int, Tensor, Tensor]]:
        """Per distinct slot (``update_slots``): (slot - base, W, mask (B, 1, T, W), which
        rows (B,) are its). W covers the members' entries only; the other rows see column 0
        (their outputs are discarded), so no softmax row is ever empty."""
        out = []
        for rel in np.unique(self.rel).tolist():
            member = self.rel == rel
            W = max(int(self.after[member].max()), 1)
            m = self._t(member)
            first = torch.arange(W, device=self.device) == 0
            mine = _causal_mask(self.lens, self.n_new, self.T, W, self.device)
            out.append((rel, W, torch.where(m[:, None, None], mine, first)[:, None], m))
        return out

    @cached_property
    def per_row(self) -> list[tuple[int, int, int, int, int, Tensor | None]]:
        """Per row with new entries (``update_rows``): (b, n, slot - base, row, W, causal
        mask (1, 1, n, W) or None for one entry: query t sits at entry W - n + t)."""
        out = []
        for b, (rel, row, n, W) in enumerate(
            zip(self.rel.tolist(), self.rows.tolist(), self.n_new.tolist(), self.after.tolist())
        ):
            if n == 0:
                continue  # padding only: nothing to attend
            mask = None
            if n > 1:
                mask = torch.ones(n, W, dtype=torch.bool, device=self.device).tril(W - n)
                mask = mask[None, None]
            out.append((b, n, rel, row, W, mask))
        return out


def _causal_mask(lens: np.ndarray, n_new: np.ndarray, T: int, W: int, device) -> Tensor:
    """(B, T, W): causal by cache index among each row's valid entries (query t of row b sits
    at entry lens[b] + t). Padding queries (outputs discarded) also see one entry of their
    own, so that no softmax row is empty (no NaN anywhere)."""
    lens_t = torch.as_tensor(lens, device=device)[:, None]  # (B, 1)
    q_idx = (lens_t + torch.arange(T, device=device)[None, :])[:, :, None]  # (B, T, 1)
    j = torch.arange(W, device=device)[None, None, :]  # (1, 1, W)
    valid = j < (lens_t + torch.as_tensor(n_new, device=device)[:, None])[:, :, None]
    return (valid & (j <= q_idx)) | (j == q_idx.clamp(max=W - 1))


def _window(mask: Tensor | None, kpos: Tensor, ctx: ForwardContext) -> Tensor:
    """``mask`` (None: everything) within the sliding window, keys at positions kpos (B, W)."""
    in_window = (ctx.positions[:, :, None] - kpos[:, None, :]) < ctx.sliding_window  # (B, T, W)
    return in_window[:, None] if mask is None else mask & in_window[:, None]
