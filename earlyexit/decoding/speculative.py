"""Lossless self-speculative decoding: the shallow exit drafts, one deep pass verifies.

(Draft & Verify, arXiv 2309.08168; LayerSkip, arXiv 2404.16710; here on FREE's shallow exit
and our batched cache.) Per call and per row, from the input token x0 at position p:

1. Draft: k + 1 shallow passes (steps 0..L_s-1) on x0, d1, ..., dk, where d_{i+1} is the
   shallow exit's argmax after x0..d_i. The shallow KV gains k + 1 entries.
2. Verify: one deep pass (steps L_s..L-1) on the k + 1 layer-L_s states: since the shallow
   steps are the full model's first steps, this yields the full model's logits g_0..g_k at
   every drafted position, and k + 1 deep KV entries.
3. Accept the longest prefix d_1..d_a with d_{i+1} = argmax g_i, then emit argmax g_a (the
   correction, or a bonus token when all k drafts pass). The entries of the k - a rejected
   drafts are dropped by shrinking the row's cache lengths, nothing else.

Greedy output is identical to full-depth decoding by construction (tested). Rows accept
different numbers of drafts; their cache lengths diverge, which the cache supports.

**Vocabulary-pruned drafting** (FR-Spec, arXiv 2502.14856): with ``draft_tokens`` (e.g. the
4k-8k most frequent tokens of a corpus, :func:`frequent_tokens`), the draft exit computes
logits over those rows of the LM head only. A 49k x 576 head costs as much as 8 of
SmolLM2's 30 layers, so a full-vocabulary draft head would eat most of what the shallow
exit saves. A token outside the set is never drafted, only emitted by the verifier, so the
output stays identical to full depth.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy, run_rows
from earlyexit.models.decoder import Decoder
from earlyexit.models.heads import PrunedHead
from earlyexit.models.kv_cache import KVCache


def frequent_tokens(tokens: np.ndarray, n: int, vocab_size: int | None = None) -> Tensor:
    """The ``n`` most frequent ids of ``tokens`` (a corpus as token ids), most frequent
    first: FR-Spec's draft vocabulary (ties broken by the smaller id)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    vocab_size = vocab_size or int(tokens.max()) + 1
    counts = np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count desc, then id
    return torch.as_tensor(order[: min(n, vocab_size)], dtype=torch.long)


class SelfSpeculative(Strategy):
    """Draft ``k`` tokens with the exit after ``exit_step`` steps, verify with one deep pass."""

    name = "speculative"
    greedy_only = True

    def __init__(self, exit_step: int, k: int = 4, draft_tokens: Tensor | None = None) -> None:
        self.ls, self.k = exit_step, k
        self.cache_slack = k + 1
        self.counts = {"calls": 0, "drafted": 0, "accepted": 0, "emitted": 0}
        self.draft_tokens = draft_tokens  # (N,) token ids the draft head may propose
        self._draft_head = None if draft_tokens is None else PrunedHead(draft_tokens)

    def _draft(self, model: Decoder, h: Tensor) -> Tensor:
        """The shallow exit's greedy draft (B,) for states ``h`` (B, d)."""
        if self._draft_head is None:
            return model.exit_logits(h, self.ls).argmax(-1)
        sub, ids = self._draft_head.logits(model, model.exit_norm(h, self.ls))  # (B, N)
        return ids[sub.argmax(-1)]

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B, k, ls, L = tokens.shape[0], self.k, self.ls, model.n_steps
        rows = np.arange(B)
        live = np.ones(B, dtype=bool) if n_new is None else n_new.astype(bool)
        step_new = None if n_new is None else n_new.copy()
        x = tokens
        states, drafts = [], []
        for i in range(k + 1):
            h = run_rows(model, cache, model.embed(x[:, None]), 0, ls, rows, step_new)  # (B, 1, d)
            states.append(h)
            if i < k:
                x = self._draft(model, h[:, 0])  # (B,) draft d_{i+1}
                drafts.append(x)
        chunk = torch.cat(states, dim=1)  # (B, k+1, d)
        deep_new = None if n_new is None else n_new * (k + 1)
        hd = run_rows(model, cache, chunk, ls, L, rows, deep_new)
        verify = model.logits(hd).argmax(-1)  # (B, k+1): the full model's next tokens
        draft = torch.stack(drafts, dim=1)  # (B, k)
        accepted = (draft == verify[:, :k]).long().cumprod(dim=1).sum(dim=1)  # (B,)
        d_host, v_host, a_host = draft.tolist(), verify.tolist(), accepted.tolist()  # one sync
        out_tokens, out_depths = [], []
        for b in rows:
            a = a_host[b]
            toks = [*d_host[b][:a], v_host[b][a]]
            out_tokens.append(toks)
            out_depths.append([L] * len(toks))
            if live[b]:  # drop the rejected drafts' entries from every KV slot
                cache.lengths[:, b] -= k - a
                self.counts["accepted"] += a
                self.counts["emitted"] += a + 1
        self.counts["calls"] += int(live.sum())
        self.counts["drafted"] += k * int(live.sum())
        return StepOutput(None, [L] * B, out_tokens, out_depths)

    def stats(self) -> dict:
        c = self.counts
        return {
            "exit_step": self.ls,
            "k": self.k,
            "draft_vocab": None if self.draft_tokens is None else len(self.draft_tokens),
            "acceptance_rate": c["accepted"] / max(c["drafted"], 1),
            "tokens_per_deep_pass": c["emitted"] / max(c["calls"], 1),
            **c,
        }
