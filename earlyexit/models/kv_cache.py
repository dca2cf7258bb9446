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

The write indices and mask for (rows, lengths) are planned once and kept (``_plans``, a few
recent entries): every step of a forward whose slot has the same lengths shares them (a
dense forward builds one mask, not one per layer), and so does the next call of the same
rows at the same lengths (a depth-wise call on the next shared block).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from earlyexit.errors import InputError


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


# Plans kept across calls (``update_slots``, ``_update``): a hit is the same rows at the same
# lengths moving on to the next block, so only the last few calls' plans are ever reused.
PLAN_CACHE = 32


class KVCache:
    """Preallocated keys and values for every KV slot of a plan.

    Args:
        n_slots: number of KV slots (``ModelConfig.n_kv_slots``).
        batch_size: rows.
        max_len: entries per (slot, row).
        n_kv_heads, head_dim: attention shape.
        device, dtype: buffer placement.
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
    ) -> None:
        shape = (n_slots, batch_size, n_kv_heads, max_len, head_dim)
        # One tensor per k / v so that rows at different steps (different slots) can be
        # written and read in one call; self.k[slot] etc. are views of one slot.
        self.k_all = torch.zeros(shape, device=device, dtype=dtype)
        self.v_all = torch.zeros(shape, device=device, dtype=dtype)
        # RoPE position of every entry (only read for sliding-window masks).
        self.pos_all = torch.zeros(n_slots, batch_size, max_len, device=device, dtype=torch.long)
        self.k, self.v, self.pos = list(self.k_all), list(self.v_all), list(self.pos_all)
        self._plans: dict = {}  # host plans of writes and masks by (rows, lengths, ...) key
        self.lengths = np.zeros((n_slots, batch_size), dtype=np.int64)  # host-side
        self.batch_size, self.max_len, self.n_slots = batch_size, max_len, n_slots
        self._block = n_kv_heads * max_len * head_dim  # elements of one (slot, row) block
        self.device = torch.device(device)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        """A cache sized for ``model`` (a ``Decoder``), on its device and dtype."""
        cfg = model.config
        p = model.tok_embeddings.weight
        return cls(
            cfg.n_kv_slots, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, p.device, p.dtype
        )

    def reset(self, rows: np.ndarray | list[int] | None = None) -> None:
        """Forget the contents of ``rows`` (all rows by default) in every slot."""
        if rows is None:
            self.lengths[:] = 0
        else:
            self.lengths[:, np.asarray(rows)] = 0

    def nbytes(self) -> int:
        return 2 * self.k_all.numel() * self.k_all.element_size()

    # ------------------------------------------------------------------ the hot path
    def update(
        self, slot: int, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append ``k``, ``v`` (B, Hkv, T, D) for ``ctx.rows`` at ``slot``; return what to attend.

        Returns:
            keys and values (B, Hkv, W, D) covering every valid entry of these rows, and a
            boolean mask (B or 1, 1, T, W), or None when every query may see every key.
        """
        if ctx.kv_slots is not None:
            return self._update_per_row_slots(k, v, ctx)
        B, _, T, _ = k.shape
        n_new = np.full(B, T, dtype=np.int64) if ctx.n_new is None else ctx.n_new
        return self._update(slot, k, v, ctx, n_new)

    def append(self, slot: int, k: Tensor, v: Tensor, ctx: ForwardContext) -> None:
        """Append ``k``, ``v`` (B, Hkv, T, D) as ``update`` does, reading nothing back (CALM's
        state propagation writes K/V only: no view or gather of the history is built)."""
        if ctx.kv_slots is not None:
            self._append_slots(k, v, ctx)
            return
        B, _, T, _ = k.shape
        n_new = np.full(B, T, dtype=np.int64) if ctx.n_new is None else ctx.n_new
        self._update(slot, k, v, ctx, n_new, read=False)

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
        base, (_, row_sl, groups) = self._append_slots(k, v, ctx)
        out = []
        for rel_slot, W, mask, member in groups:
            slot = rel_slot + base
            # views for contiguous rows; other row sets are gathered (as in the plain path)
            k_s, v_s = self.k[slot][row_sl, :, :W], self.v[slot][row_sl, :, :W]
            if ctx.sliding_window is not None:
                mask = self._window_mask(mask, self.pos[slot], _as_rows(row_sl), W, ctx)
            out.append((k_s, v_s, mask, member))
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
        (``layers.depthwise_attention_mode``). Not for sliding windows or KV sharing."""
        if ctx.sliding_window is not None or ctx.stash_slots:
            raise ValueError("row-by-row attention does not apply to windows or KV sharing")
        self._append_slots(k, v, ctx)
        rows = np.arange(k.shape[0]) if ctx.rows is None else ctx.rows
        slots = ctx.kv_slots
        n_new = np.full(k.shape[0], k.shape[2]) if ctx.n_new is None else ctx.n_new
        after = self.lengths[slots, rows]  # (B,) entries after the write
        out = []
        for b, (slot, row, n, W) in enumerate(
            zip(slots.tolist(), rows.tolist(), n_new.tolist(), after.tolist())
        ):
            if n == 0:
                continue  # padding only: nothing to attend
            mask = None
            if n > 1:  # query t of this row sits at entry W - n + t
                mask = torch.ones(n, W, dtype=torch.bool, device=self.device).tril(W - n)[
                    None, None
                ]
            out.append(
                (b, n, self.k[slot][row : row + 1, :, :W], self.v[slot][row : row + 1, :, :W], mask)
            )
        return out

    def append_blocks(
        self, slot: int, B: int, T: int, ctx: ForwardContext
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reserve each row's new entries for the decode kernel (``decode_kernel.py``), which
        writes them and attends in one pass: each of the B rows at its own slot
        (``ctx.kv_slots``) or at ``slot``, ``ctx.n_new`` (default T) entries each. Returns
        each row's block offset into ``k_all`` / ``v_all`` in elements, its entries before
        the append and its new entries, (B,) host int64 each.

        Runs once per layer per decode step: what depends only on the forward's rows (their
        checks and offsets) is worked out once and kept in ``ctx``."""
        memo = ctx._memo.get("blocks")
        if memo is None:
            memo = ctx._memo["blocks"] = self._plan_blocks(B, T, ctx)
        rows, n_new, offsets, slots = memo
        if slots is None:  # every row at this step's slot: offsets are the rows' within it
            if not 0 <= slot < self.n_slots:
                raise IndexError(f"KV slot {slot} out of range")
            slots, offsets = slot, offsets + slot * self.batch_size * self._block
        starts = self.lengths[slots, rows]
        after = starts + n_new
        if after.max() > self.max_len:
            raise InputError(
                f"KV cache full: {int(after.max())} entries exceed its length {self.max_len}"
            )
        self.lengths[slots, rows] = after
        return offsets, starts, n_new

    def _plan_blocks(self, B: int, T: int, ctx: ForwardContext):
        """The rows' part of ``append_blocks``, checked: the kernel writes raw memory at
        these offsets, so no index may wrap around or run past the buffers."""
        rows = np.arange(B) if ctx.rows is None else ctx.rows
        n_new = np.full(B, T, dtype=np.int64) if ctx.n_new is None else ctx.n_new
        slots = ctx.kv_slots
        if rows.min() < 0 or rows.max() >= self.batch_size:
            raise IndexError(f"cache rows {rows.tolist()} out of range")
        if slots is not None and (slots.min() < 0 or slots.max() >= self.n_slots):
            raise IndexError(f"KV slots {slots.tolist()} out of range")
        if (n_new < 0).any() or (n_new > T).any():
            raise ValueError(f"n_new must be within [0, {T}], got {n_new}")
        flat = rows if slots is None else slots * self.batch_size + rows  # (slot x row) index
        return rows, n_new, flat * self._block, slots

    def _append_slots(self, k: Tensor, v: Tensor, ctx: ForwardContext):
        """Append each row's new entries to its own slot (``ctx.kv_slots``); return the
        lowest slot of the call and the call's plan (``_plan_slots``)."""
        B, _, T, _ = k.shape
        rows = np.arange(B) if ctx.rows is None else ctx.rows
        slots = ctx.kv_slots
        lens = self.lengths[slots, rows]
        n_new = np.full(B, T, dtype=np.int64) if ctx.n_new is None else ctx.n_new
        # The plan depends on the slots only relative to the lowest one: the same rows moving
        # on to the next shared block (slots + 1, same lengths) reuse it, so consecutive
        # depth-wise calls do not rebuild it (host work a plain call would not pay).
        base = int(slots.min())
        rel = slots - base
        key = (rel.tobytes(), rows.tobytes(), lens.tobytes(), n_new.tobytes(), T)
        meta = self._plans.get(key)
        if meta is None:
            if len(self._plans) >= PLAN_CACHE:  # a long-lived server sees many shapes
                self._plans.clear()
            meta = self._plans[key] = self._plan_slots(rel, rows, lens, n_new, T)
        flat_rel, c_w, b_sel, t_sel, single = meta[0]
        flat = flat_rel + base * self.batch_size if base else flat_rel  # slot * batch + row
        if single:  # one entry per row: the new keys are (B, Hkv, D) as they are
            new_k, new_v = k[:, :, 0], v[:, :, 0]
        else:
            new_k, new_v = k.transpose(1, 2)[b_sel, t_sel], v.transpose(1, 2)[b_sel, t_sel]
        # (slot * batch + row)-indexed views: each row's own slot in one two-index scatter
        self.k_all.flatten(0, 1)[flat, :, c_w] = new_k  # (N, Hkv, D)
        self.v_all.flatten(0, 1)[flat, :, c_w] = new_v
        if ctx.sliding_window is not None or set(slots.tolist()) & ctx.stash_slots:
            self.pos_all.flatten(0, 1)[flat, c_w] = ctx.positions[b_sel, t_sel]
        self.lengths[slots, rows] = lens + n_new
        return base, meta

    def _plan_slots(self, rel, rows, lens, n_new, T):
        """Writes, the rows' view and each slot's (relative slot, W, mask, member) for
        ``update_slots``; ``rel``: each row's slot minus the call's lowest slot.

        Host arithmetic only, vectorized over the call's slots, with one host-to-device
        conversion each for the writes and the masks. W covers the members' entries only:
        the other rows see column 0 (their outputs are discarded)."""
        B = len(rows)
        if (lens + n_new).max() > self.max_len:
            raise InputError(
                f"KV cache full: {int((lens + n_new).max())} entries exceed its length {self.max_len}"
            )
        single = T == 1 and bool(n_new.all())  # decode: every row appends one entry
        if single:
            b_sel, t_sel = np.arange(B), np.zeros(B, dtype=np.int64)
        else:
            b_sel, t_sel = np.nonzero(np.arange(T)[None, :] < n_new[:, None])
        w = torch.as_tensor(
            np.stack(
                [rel[b_sel] * self.batch_size + rows[b_sel], lens[b_sel] + t_sel, b_sel, t_sel]
            ),
            device=self.device,
        )
        writes = (*w.unbind(0), single)  # flat (slot, row) index, column, batch, query index
        contiguous = rows[0] >= 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + B))
        row_sl = (
            slice(int(rows[0]), int(rows[0]) + B)
            if contiguous
            else torch.as_tensor(rows, device=self.device)
        )
        uniq = np.unique(rel)  # (G,)
        member = rel[None, :] == uniq[:, None]  # (G, B)
        after = np.where(member, lens + n_new, 0)  # (G, B) members' entries after the write
        Ws = np.maximum(after.max(axis=1), 1)  # (G,)
        j = np.arange(int(Ws.max()))[None, None, None, :]
        # members: causal by index over their entries; a member's query t sits at lens + t.
        # Others (outputs discarded) and padding queries see column 0 only, so no softmax
        # row is ever empty.
        t = np.arange(T)[None, None, :, None]
        q_idx = lens[None, :, None, None] + t  # (1, B, T, 1)
        valid = (j < after[:, :, None, None]) & (j <= q_idx)
        live = member[:, :, None, None] & (t < n_new[None, :, None, None])
        masks = torch.as_tensor(np.where(live, valid, j == 0)[:, :, None], device=self.device)
        members = torch.as_tensor(member, device=self.device)
        groups = [
            (int(slot), int(W), masks[g, ..., : int(W)], members[g])
            for g, (slot, W) in enumerate(zip(uniq, Ws))
        ]
        return writes, row_sl, groups

    def _update(
        self, slot: int, k: Tensor, v: Tensor, ctx: ForwardContext, n_new: np.ndarray, read=True
    ):
        B, _, T, _ = k.shape
        if ctx.rows is None:
            rows, lens = np.arange(B), self.lengths[slot, :B]  # (B,) host
        else:
            rows, lens = ctx.rows, self.lengths[slot, ctx.rows]
        key = ("plain", lens.tobytes(), None if ctx.rows is None else rows.tobytes())
        key += (n_new.tobytes(), T)
        meta = self._plans.get(key)  # every step of a forward, and later calls alike
        if meta is None:
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            meta = self._plans[key] = self._plan_update(lens, rows, n_new, T)
        row_sl, col_idx, W, mask = meta
        kb, vb, pb = self.k[slot], self.v[slot], self.pos[slot]
        windowed = ctx.sliding_window is not None
        keep_pos = windowed or slot in ctx.stash_slots  # positions are read for these only
        if isinstance(col_idx, slice):  # every row writes T entries at the same offset
            kb[row_sl, :, col_idx] = k
            vb[row_sl, :, col_idx] = v
            if keep_pos:
                pb[row_sl, col_idx] = ctx.positions
        else:  # only the valid (row, t) pairs are written; padding never touches the cache
            w_rows, w_cols, b_sel, t_sel = col_idx
            kb[w_rows, :, w_cols] = k.transpose(1, 2)[b_sel, t_sel]  # (N, Hkv, D)
            vb[w_rows, :, w_cols] = v.transpose(1, 2)[b_sel, t_sel]
            if keep_pos:
                pb[w_rows, w_cols] = ctx.positions[b_sel, t_sel]
        self.lengths[slot, rows] = lens + n_new
        if not read:
            return None
        if isinstance(row_sl, slice):
            k_all, v_all = kb[row_sl, :, :W], vb[row_sl, :, :W]
        else:
            k_all, v_all = kb[row_sl[:, 0], :, :W], vb[row_sl[:, 0], :, :W]  # gathers a copy
        if windowed:
            mask = self._window_mask(mask, pb, row_sl, W, ctx)
        return k_all, v_all, mask

    def read(self, slot: int, ctx: ForwardContext) -> tuple[Tensor, Tensor, Tensor]:
        """Keys, values (B, Hkv, W, D) of ``slot`` for ``ctx.rows`` without appending, and a
        mask letting each query see the entries at positions up to its own (KV sharing)."""
        B = ctx.positions.shape[0]
        rows = np.arange(B) if ctx.rows is None else ctx.rows
        lens = self.lengths[slot, rows]
        W = max(int(lens.max()), 1)
        if rows[0] >= 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + B)):
            sl = slice(int(rows[0]), int(rows[0]) + B)
            k, v, kpos = self.k[slot][sl, :, :W], self.v[slot][sl, :, :W], self.pos[slot][sl, :W]
        else:
            r = torch.as_tensor(rows, device=self.device)
            k, v, kpos = self.k[slot][r, :, :W], self.v[slot][r, :, :W], self.pos[slot][r, :W]
        j = torch.arange(W, device=self.device)[None, None, :]
        valid = j < torch.as_tensor(lens, device=self.device)[:, None, None]
        mask = valid & (kpos[:, None, :] <= ctx.positions[:, :, None])  # (B, T, W)
        return k, v, mask[:, None]

    def _update_per_row_slots(self, k: Tensor, v: Tensor, ctx: ForwardContext):
        """Each row appends to its own slot ``ctx.kv_slots[b]`` (rows at different steps of one
        shared block: depth-wise batching). Keys and values are gathered per (slot, row)."""
        B, _, T, _ = k.shape
        rows = np.arange(B) if ctx.rows is None else ctx.rows
        slots = ctx.kv_slots
        lens = self.lengths[slots, rows]
        n_new = np.full(B, T, dtype=np.int64) if ctx.n_new is None else ctx.n_new
        key = ("slots", slots.tobytes(), rows.tobytes(), lens.tobytes(), n_new.tobytes(), T)
        meta = ctx._memo.get(key)
        if meta is None:
            if (lens + n_new).max() > self.max_len:
                raise InputError(
                    f"KV cache full: {int((lens + n_new).max())} entries exceed its length {self.max_len}"
                )
            b_sel, t_sel = np.nonzero(np.arange(T)[None, :] < n_new[:, None])
            as_t = functools.partial(torch.as_tensor, device=self.device)
            writes = (
                as_t(slots[b_sel]),
                as_t(rows[b_sel]),
                as_t(lens[b_sel] + t_sel),
                as_t(b_sel),
                as_t(t_sel),
            )
            W = max(int((lens + n_new).max()), 1)
            lens_t = as_t(lens)[:, None]
            q_idx = (lens_t + torch.arange(T, device=self.device)[None, :])[:, :, None]
            j = torch.arange(W, device=self.device)[None, None, :]
            valid = j < (lens_t + as_t(n_new)[:, None])[:, :, None]
            mask = ((valid & (j <= q_idx)) | (j == q_idx.clamp(max=W - 1)))[:, None]
            meta = ctx._memo[key] = (writes, W, mask, as_t(slots), as_t(rows))
        (s_w, r_w, c_w, b_sel, t_sel), W, mask, slots_t, rows_t = meta
        self.k_all[s_w, r_w, :, c_w] = k.transpose(1, 2)[b_sel, t_sel]  # (N, Hkv, D)
        self.v_all[s_w, r_w, :, c_w] = v.transpose(1, 2)[b_sel, t_sel]
        windowed = ctx.sliding_window is not None
        if windowed:
            self.pos_all[s_w, r_w, c_w] = ctx.positions[b_sel, t_sel]
        self.lengths[slots, rows] = lens + n_new
        k_all = self.k_all[slots_t, rows_t, :, :W]  # (B, Hkv, W, D) gathered
        v_all = self.v_all[slots_t, rows_t, :, :W]
        if windowed:
            kpos = self.pos_all[slots_t, rows_t, :W]  # (B, W)
            in_window = (ctx.positions[:, :, None] - kpos[:, None, :]) < ctx.sliding_window
            mask = mask & in_window[:, None]
        return k_all, v_all, mask

    def _plan_update(self, lens: np.ndarray, rows: np.ndarray, n_new: np.ndarray, T: int):
        """Indices and mask for one (rows, lengths) pattern; host arithmetic only, a pure
        function of its arguments (plans are cached across forwards)."""
        B = len(rows)
        if (n_new < 0).any() or (n_new > T).any():
            raise ValueError(f"n_new must be within [0, {T}], got {n_new}")
        if (lens + n_new).max() > self.max_len:
            raise InputError(
                f"KV cache full: {int((lens + n_new).max())} entries exceed its length {self.max_len}"
            )
        contiguous = rows[0] >= 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + B))
        dev = self.device
        if contiguous:
            row_sl = slice(int(rows[0]), int(rows[0]) + B)
        else:
            row_sl = torch.as_tensor(rows, device=dev)[:, None]  # (B, 1)
        uniform = bool((lens == lens[0]).all() and (n_new == T).all())
        if uniform and contiguous and lens[0] + T <= self.max_len:
            L = int(lens[0])
            col_idx = slice(L, L + T)
            W = L + T
            mask = None
            if T > 1:  # causal with an offset of L past entries
                mask = torch.ones(T, W, dtype=torch.bool, device=dev).tril(diagonal=L)[None, None]
            return row_sl, col_idx, W, mask
        # Write only the valid (row, t) pairs: padding never lands in the cache, so a row
        # near its capacity can share a chunk with a longer one.
        b_sel, t_sel = np.nonzero(np.arange(T)[None, :] < n_new[:, None])
        as_t = functools.partial(torch.as_tensor, device=dev)
        writes = (as_t(rows[b_sel]), as_t(lens[b_sel] + t_sel), as_t(b_sel), as_t(t_sel))
        W = max(int((lens + n_new).max()), 1)
        lens_t = as_t(lens)[:, None]  # (B, 1)
        q_idx = (lens_t + torch.arange(T, device=dev)[None, :])[:, :, None]  # (B, T, 1)
        j = torch.arange(W, device=dev)[None, None, :]  # (1, 1, W)
        valid = j < (lens_t + as_t(n_new)[:, None])[:, :, None]
        # Causal by index among valid entries. Padding queries (outputs discarded) also see
        # one slot of their own so that no softmax row is empty (no NaN anywhere).
        mask = (valid & (j <= q_idx)) | (j == q_idx.clamp(max=W - 1))  # (B, T, W)
        return row_sl, writes, W, mask[:, None]

    @staticmethod
    def _window_mask(
        mask: Tensor | None, pb: Tensor, row_sl, W: int, ctx: ForwardContext
    ) -> Tensor:
        kpos = pb[row_sl, :W] if isinstance(row_sl, slice) else pb[row_sl[:, 0], :W]  # (B, W)
        qpos = ctx.positions  # (B, T)
        in_window = (qpos[:, :, None] - kpos[:, None, :]) < ctx.sliding_window  # (B, T, W)
        T = qpos.shape[1]
        if mask is None:
            mask = torch.ones(1, 1, T, W, dtype=torch.bool, device=pb.device)
        return mask & in_window[:, None]


def _as_rows(row_sl):
    """``_window_mask`` takes a slice or a (B, 1) index tensor of rows."""
    return row_sl if isinstance(row_sl, slice) else row_sl[:, None]
