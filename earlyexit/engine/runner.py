"""The model runner: executes what the scheduler decided. Tensors only, no policy.

- Owns the KV cache (one row per running request) and each request's in-flight hidden
  states: the (T, d) input of its next step (one token or FREE's catch-up chunk), kept in
  one (rows, T, d) buffer so a call gathers and scatters its rows in one op each.
- ``prefill``: full-depth forward of newly admitted prompts (ragged, right-padded).
- ``run``: execute (row, start, stop) items. Whole segments (static / continuous) run per
  group of equal (start, stop) with ``run_steps``; a depth-wise iteration runs one block on
  rows at different steps of it in **one** call, each row with its own KV slot, cache
  length, positions and LoRA slot (``Decoder.run_block``).
- ``logits`` at an exit point or the end (one full-head matmul per call; exits over a pruned
  head when the engine has one), ``margin`` confidences, and sampling with each request's
  own parameters and generator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.confidence import confidence
from earlyexit.decoding.sampling import sample
from earlyexit.decoding.speculative import propose
from earlyexit.models.decoder import Decoder
from earlyexit.models.heads import PrunedHead
from earlyexit.models.kernels import linear
from earlyexit.models.kv_cache import KVCache


class ModelRunner:
    """Executes prefill, steps and sampling for the engine."""

    def __init__(
        self, model: Decoder, max_batch: int, max_len: int, exit_head: PrunedHead | None = None
    ) -> None:
        self.model, self.plan, self.L = model, model.plan, model.n_steps
        self.exit_head = exit_head  # exit decisions over a token subset (None: full head)
        self.cache = KVCache.for_model(model, max_batch, max_len)
        p = model.tok_embeddings.weight
        self.device = p.device
        d = model.config.d_model
        # row -> (T, d) input of its next step; T = hlen[row] (1, or FREE's chunk length)
        self.hbuf = torch.zeros(max_batch, max_len + 1, d, device=p.device, dtype=p.dtype)
        self.hlen = np.zeros(max_batch, dtype=np.int64)
        # row -> FREE's pending layer-L_s states of exited tokens
        self.sbuf = torch.zeros(max_batch, max_len + 1, d, device=p.device, dtype=p.dtype)
        self.slen = np.zeros(max_batch, dtype=np.int64)
        # MoR: each row's state entering its current recursion, the router's input (token-
        # choice), and its gate
        self.mor_in = torch.zeros(max_batch, d, device=p.device, dtype=p.dtype)
        self.mor_h1 = torch.zeros(max_batch, d, device=p.device, dtype=p.dtype)
        self.mor_gate = torch.zeros(max_batch, device=p.device, dtype=p.dtype)
        # row -> the step after which a plain speculative round writes the draft adapter's
        # entry on its way down (-1: none)
        self.adapter_at = np.full(max_batch, -1, dtype=np.int64)
        self.block_calls = 0
        self.block_rows = 0  # rows summed over block calls (a sum, not a list: servers run long)

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, rows: list[int], prompts: list[list[int]]) -> tuple[Tensor, list[int]]:
        """Forward new prompts in cache ``rows`` (full depth; a MoR model routes each token);
        next-token logits at each prompt's end (G, V) and the steps that position ran."""
        if self.model.routers is not None:
            return self._prefill_mor(rows, prompts)
        last = self._prefill_hidden(rows, prompts)
        return self.model.logits(last), [self.L] * len(rows)

    def _prefill_mor(self, rows: list[int], prompts: list[list[int]]) -> tuple[Tensor, list[int]]:
        from earlyexit.models.mor import step_depth

        self.cache.reset(rows)
        self.slen[rows] = 0
        tokens, lens, positions = self._pad(prompts)
        out = self.model(
            tokens, positions, self.cache, rows=np.asarray(rows), n_new=lens, return_routing=True
        )
        b = torch.arange(len(rows), device=self.device)
        last = torch.as_tensor(lens - 1, device=self.device)
        return out.logits[b, last], step_depth(self.model, out.recursions[b, last]).tolist()

    def _pad(self, prompts: list[list[int]]):
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        positions = torch.arange(tokens.shape[1], device=self.device)[None].expand(len(prompts), -1)
        return tokens.to(self.device), lens, positions

    def _prefill_hidden(self, rows: list[int], prompts: list[list[int]]) -> Tensor:
        self.cache.reset(rows)
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        tokens = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        tokens = tokens.to(self.device)
        m = self.model
        positions = torch.arange(tokens.shape[1], device=self.device)[None].expand(len(rows), -1)
        ctx = m.context(positions, self.cache, rows=np.asarray(rows), n_new=lens)
        h = m.run_filling_exits(m.embed(tokens), ctx)  # (G, T, d): drafts attend over the prompt
        self.block_calls += self.L
        self.block_rows += len(rows) * self.L
        last = h[
            torch.arange(len(rows), device=self.device),
            torch.as_tensor(lens - 1, device=self.device),
        ]
        self.slen[rows] = 0
        return last

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def run(self, items: list[tuple[int, int, int]], one_block: bool) -> None:
        """Run (row, start, stop) items on each row's in-flight hidden states, in place."""
        if one_block:
            self._run_block(items)
            return
        groups: dict[tuple[int, int], list[int]] = {}
        for row, start, stop in items:
            groups.setdefault((start, stop), []).append(row)
        for (start, stop), rows in groups.items():
            # cut where a row's draft adapter entry is due (a plain speculative round)
            cuts = {int(s) for s in self.adapter_at[rows] if start < s < stop}
            edges = [start, *sorted(cuts), stop]
            for a, b in zip(edges, edges[1:]):
                self._fill_adapters(rows, [a] * len(rows))
                h, n = self._gather(rows)
                pos = self._positions(rows, [a] * len(rows), h.shape[1])
                ctx = self.model.context(pos, self.cache, rows=np.asarray(rows), n_new=n)
                out = self.model.run_steps(a, b, h, ctx)
                self.block_calls += b - a
                self.block_rows += len(rows) * (b - a)
                self._scatter(rows, out, n)

    def fill_adapter_at(self, row: int, step: int) -> None:
        """A plain speculative round: when ``row``'s state reaches ``step`` on its way down,
        append its entry to the KV of the attention adapter of the exit after ``step`` (a
        later round's drafts attend over every position). No-op for exits without one."""
        if self.model.exit_attention is not None and self.model.exit_index(step) is not None:
            self.adapter_at[row] = step

    def _fill_adapters(self, rows: list[int], steps: list[int]) -> None:
        """Write the adapter entries due now: rows whose state is at their mark."""
        r, s = np.asarray(rows), np.asarray(steps)
        due = self.adapter_at[r] == s  # (G,): one vector compare on every run, usually none
        if not due.any():
            return
        for step in np.unique(s[due]).tolist():
            rs = r[due & (s == step)]
            self.write_adapter_kv(rs.tolist(), step)
            self.adapter_at[rs] = -1

    def _run_block(self, items: list[tuple[int, int, int]]) -> None:
        m = self.model
        rows = [r for r, _, _ in items]
        steps = [s for _, s, _ in items]
        self._fill_adapters(rows, steps)
        shares = [self.plan[s].shares_kv for s in steps]
        if any(shares) and not all(shares):  # MoR KV sharing: readers and writers apart
            for want in (False, True):
                self._run_block([it for it, sh in zip(items, shares) if sh == want])
            return
        h, n = self._gather(rows)
        kv_slots = [self.plan[s].kv_slot for s in steps]
        pos = self._positions(rows, steps, h.shape[1])
        if len(set(steps)) == 1:  # every row at the same step: the plain step path
            ctx = m.context(pos, self.cache, rows=np.asarray(rows), n_new=n)
            out = m.run_step(steps[0], h, ctx)
        elif len(set(kv_slots)) == 1:  # KV sharing: different recursions, one shared slot
            ctx = m.context(pos, self.cache, rows=np.asarray(rows), n_new=n)
            out = m.blocks[self.plan[steps[0]].block](h, ctx, kv_slots[0], None, shares[0])
        else:
            ctx = m.context(pos, self.cache, rows=np.asarray(rows), n_new=n, kv_slots=kv_slots)
            loras = [self.plan[s].lora for s in steps]
            lora_t = None if loras[0] is None else torch.tensor(loras, device=self.device)
            out = m.blocks[self.plan[steps[0]].block](h, ctx, -1, lora_t, shares[0])
        self.block_calls += 1
        self.block_rows += len(rows)
        self._scatter(rows, out, n)

    def _gather(self, rows: list[int]) -> tuple[Tensor, np.ndarray]:
        """The rows' hidden states right-padded as (G, Tmax, d); valid lengths (G,)."""
        n = self.hlen[rows]
        idx = torch.as_tensor(rows, device=self.device)
        return self.hbuf[idx, : int(n.max())], n

    def _scatter(self, rows: list[int], out: Tensor, n: np.ndarray) -> None:
        idx = torch.as_tensor(rows, device=self.device)
        self.hbuf[idx, : out.shape[1]] = out

    def _positions(self, rows: list[int], starts: list[int], T: int) -> Tensor:
        """RoPE positions of each row's in-flight tokens. The first step's slot holds every
        token of the row: before step 0 runs, the in-flight tokens come after its entries;
        afterwards they are its last ``hlen`` entries. (Deeper slots may hold fewer tokens:
        FREE's lagging deep cache, MoR's recursion-wise caches.)"""
        r = np.asarray(rows)
        first = self.cache.lengths[self.plan[0].kv_slot, r]
        written = np.where(np.asarray(starts) > 0, self.hlen[r], 0)
        start = torch.as_tensor(first - written, device=self.device)
        return start[:, None] + torch.arange(T, device=self.device)[None, :]

    # ------------------------------------------------------------------ decisions
    @torch.inference_mode()
    def logits(self, rows: list[int], steps: list[int]) -> Tensor:
        """Logits (G, V) of each row's last in-flight position at exit point ``steps[i]``.

        Every row that needs the full head (the final one, or an exit's when there is no
        pruned exit head) shares **one** head matmul: the head weighs as much as several
        blocks and is read once per call whatever the rows, so rows at different exit
        points must not each pay it. Exit rows use ``exit_head`` (a pruned head) if set."""
        m = self.model
        h = self._last(rows)  # (G, d)
        out = torch.empty(len(rows), m.config.vocab_size, device=self.device, dtype=h.dtype)
        full_idx, full_h = [], []
        for s in sorted(set(steps)):
            it = torch.as_tensor([i for i, x in enumerate(steps) if x == s], device=self.device)
            if s < self.L and self.exit_head is not None:
                out[it] = m.exit_logits(h[it], s, self.exit_head)
            else:  # normed now, through the shared head below
                full_idx.append(it)
                full_h.append(m.exit_norm(h[it], s) if s < self.L else m.norm(h[it]))  # (g, d)
        if full_idx:
            out[torch.cat(full_idx)] = linear(torch.cat(full_h), m.head_weight())
        return out

    @torch.inference_mode()
    def confidences(self, measure: str, rows: list[int], step: int, logits: Tensor) -> Tensor:
        """Exit confidence (G,) of each row's last in-flight position at ``step`` from its
        exit ``logits`` (G, V) (the classifier reads the state itself)."""
        if measure != "classifier":
            return confidence(measure, logits)
        return confidence(measure, logits, self.model, step, self._last(rows))

    def _last(self, rows: list[int]) -> Tensor:
        """Each row's last in-flight hidden state (G, d)."""
        last = torch.as_tensor(self.hlen[rows] - 1, device=self.device)
        return self.hbuf[torch.as_tensor(rows, device=self.device), last]

    @torch.inference_mode()
    def draft(self, rows: list[int], step: int, head: PrunedHead | None) -> tuple[Tensor, Tensor]:
        """Self-speculation: each row's draft token (G,) and its probability (G,) from its
        last in-flight state through the exit after ``step`` (its attention adapter appends
        this position to its KV) and the draft ``head`` (pruned, or the full head)."""
        fill = self.model.exit_context(step, self.cache, rows)
        hn = self.model.exit_norm(self._last(rows), step, None if fill is None else fill[0])
        return propose(self.model, hn, head)

    @torch.inference_mode()
    def write_adapter_kv(self, rows: list[int], step: int) -> None:
        """The attention adapter's K/V for each row's last in-flight state without a draft
        (the last state of a round of ``k`` drafts, where the next round may start)."""
        fill = self.model.exit_context(step, self.cache, rows)
        if fill is not None:
            e = self.model.exit_index(step)
            self.model.exit_attention[e].write_kv(self._last(rows)[:, None], *fill)

    @torch.inference_mode()
    def chunk_argmax(self, rows: list[int]) -> list[list[int]]:
        """The full model's argmax at every in-flight position of each row (a deep pass over
        a chunk just ended): one head matmul for all rows' positions; one host sync."""
        n = self.hlen[rows]
        r = torch.as_tensor(np.repeat(rows, n), device=self.device)
        t = torch.as_tensor(np.concatenate([np.arange(k) for k in n]), device=self.device)
        flat = self.model.logits(self.hbuf[r, t]).argmax(-1).tolist()  # (sum n,)
        out, i = [], 0
        for k in n:
            out.append(flat[i : i + int(k)])
            i += int(k)
        return out

    def rollback(self, row: int, n: int) -> None:
        """Drop the last ``n`` entries of every KV slot of ``row`` (rejected drafts)."""
        if n:
            self.cache.lengths[:, row] -= n

    @torch.inference_mode()
    def sample(self, logits: Tensor, params: list, generators: list) -> Tensor:
        return sample(
            logits,
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            generators,
        )

    @torch.inference_mode()
    def start_tokens(self, rows: list[int], tokens: list[int]) -> None:
        """Each row's next input: the embedding of its new token."""
        emb = self.model.embed(torch.tensor(tokens, device=self.device))  # (G, d)
        self.hbuf[torch.as_tensor(rows, device=self.device), 0] = emb
        self.hlen[rows] = 1

    def push_stack(self, rows: list[int]) -> None:
        """FREE: these tokens exited; keep their layer-L_s states for the deep catch-up."""
        idx = torch.as_tensor(rows, device=self.device)
        pos = torch.as_tensor(self.slen[rows], device=self.device)
        last = torch.as_tensor(self.hlen[rows] - 1, device=self.device)
        self.sbuf[idx, pos] = self.hbuf[idx, last]
        self.slen[rows] += 1

    @torch.inference_mode()
    def propagate(self, rows: list[int], step: int) -> None:
        """CALM's state propagation for tokens that exited after ``step`` steps: each row's
        exit state (its last in-flight position) is written as keys and values at every
        skipped step ``step .. L-1``, running only those steps' K/V projections."""
        m = self.model
        r = np.asarray(rows)
        idx = torch.as_tensor(rows, device=self.device)
        last = torch.as_tensor(self.hlen[r] - 1, device=self.device)
        h = self.hbuf[idx, last][:, None]  # (G, 1, d)
        pos = torch.as_tensor(self.cache.lengths[self.plan[0].kv_slot, r] - 1, device=self.device)
        ctx = m.context(pos[:, None], self.cache, rows=r)
        for j in range(step, self.L):
            m.kv_only_step(j, h, ctx)

    def start_catch_up(self, row: int) -> None:
        """FREE: the next segment runs the deep steps on [pending states, current]."""
        n = int(self.slen[row])
        if n:
            current = self.hbuf[row, 0].clone()
            self.hbuf[row, :n] = self.sbuf[row, :n]
            self.hbuf[row, n] = current
            self.hlen[row] = n + 1
        self.slen[row] = 0

    # ------------------------------------------------------------------ MoR routing
    @torch.inference_mode()
    def route(self, rows: list[int], r: int) -> Tensor:
        """Expert-choice decision scores (G,) for recursion ``r``: a row continues iff its
        score is > 0. They are the auxiliary router's when the model has one (it decides at
        inference, as in ``models/mor.py``), else the main router's z_r. Remembers each
        row's recursion input and gate alpha * sigmoid(z_r) (always the main router's)."""
        routers = self.model.routers
        idx = torch.as_tensor(rows, device=self.device)
        h = self.hbuf[idx, 0]
        z = routers.scores(r, h)
        self.mor_in[idx] = h
        self.mor_gate[idx] = routers.gate(z).to(h.dtype)
        return z if routers.aux is None else routers.aux_scores(r, h)

    @torch.inference_mode()
    def route_depth(self, rows: list[int]) -> Tensor:
        """Token-choice: each row's depth choice (G,) (0-based last recursion); remembers
        the router input and the chosen probability as the gate."""
        idx = torch.as_tensor(rows, device=self.device)
        h = self.hbuf[idx, 0]
        routers = self.model.routers
        probs = routers.depth_logits(h).softmax(-1) * routers.alpha  # (G, N_r)
        choice = (probs + routers.bias).argmax(-1)  # the loss-free balancing bias included
        self.mor_h1[idx] = h
        self.mor_gate[idx] = probs.gather(-1, choice[:, None])[:, 0].to(h.dtype)
        return choice

    @torch.inference_mode()
    def finish_recursion(self, rows: list[int], mode: str) -> None:
        """Apply a finished recursion's update: ``code``: H_in + g F(H_in); ``token``:
        H_1 + g F(H) (a token-choice row's last recursion); ``replace``: F(H) as is."""
        if not rows or mode == "replace":
            return
        idx = torch.as_tensor(rows, device=self.device)
        base = self.mor_in[idx] if mode == "code" else self.mor_h1[idx]
        self.hbuf[idx, 0] = base + self.mor_gate[idx, None] * self.hbuf[idx, 0]

    def clear_stack(self, rows: list[int]) -> None:
        self.slen[rows] = 0

    def release(self, row: int) -> None:
        self.hlen[row] = 0
        self.slen[row] = 0
        self.adapter_at[row] = -1
