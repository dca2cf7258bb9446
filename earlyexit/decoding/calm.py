"""CALM-style early exit (Schuster et al. 2022, arXiv 2207.07061), batched per row.

- A token checks every exit from ``min_exit`` on; it leaves at the first exit whose
  confidence is >= lambda_t, or runs to the last step.
- lambda_t is constant, or decays with the token's position t among N = max new tokens:
  lambda_t = 0.9 lambda + 0.1 lambda exp(-tau t / N) (CALM's code).
- Missing deep KV is filled by state propagation: an exited token's state stands in for
  every skipped step, which then runs only its K/V projection (``only_propagate_state``).
  With ``deep_kv="skip"`` it is left missing instead: later tokens attend, at each step,
  over the tokens that ran it (recursion-wise caching, as MoR does), and each token costs
  exactly its own depth.
- Each row exits on its own: the rows still running go on as a smaller batch (one host sync
  per exit checked, for the whole batch). ``sync_batch=True`` is the naive batched variant
  CALM's code implies: the whole batch exits only when its least confident row passes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy, slot_positions
from earlyexit.decoding.confidence import DEFAULT_THRESHOLD, confidence
from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache


def calm_threshold(threshold: float, tau: float | None, t: int, n_max: int) -> float:
    """CALM's lambda_t for the ``t``-th generated token of at most ``n_max``: constant
    without ``tau``, else 0.9 lambda + 0.1 lambda exp(-tau t / N) (CALM's code). The engine
    and :class:`CALM` both read it."""
    if tau is None:
        return threshold
    return 0.9 * threshold + 0.1 * threshold * math.exp(-tau * t / max(n_max, 1))


class CALM(Strategy):
    """Per-row confidence-based early exit with state propagation."""

    name = "calm"

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        min_exit: int = 1,
        decay_tau: float | None = None,
        measure: str = "margin",
        sync_batch: bool = False,
        deep_kv: str = "propagate",
    ) -> None:
        if deep_kv not in ("propagate", "skip"):
            raise ValueError(f"deep_kv must be 'propagate' or 'skip', got {deep_kv!r}")
        self.deep_kv = deep_kv
        self.threshold, self.min_exit, self.tau, self.measure = (
            threshold,
            min_exit,
            decay_tau,
            measure,
        )
        self.sync_batch = sync_batch
        self.counts = {"tokens": 0, "exited": 0, "depth_sum": 0}

    def begin(self, model: Decoder, cache: KVCache, batch_size: int, max_new_tokens: int) -> None:
        self.t = 0
        self.n_max = max_new_tokens

    def threshold_at(self, t: int) -> float:
        return calm_threshold(self.threshold, self.tau, t, self.n_max)

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B = tokens.shape[0]
        L = model.n_steps
        dev = tokens.device
        self.t += 1
        lam = self.threshold_at(self.t)
        rows = np.arange(B)
        live = np.ones(B, dtype=bool) if n_new is None else n_new.astype(bool)
        # every row's position is fixed for this token; take it before any slot grows
        pos_all = slot_positions(model, cache, 0, rows)  # (B, 1)
        out_logits: Tensor | None = None
        depths = [L] * B
        active = rows  # rows still running, as cache rows
        h = model.embed(tokens[:, None])  # (B, 1, d) for `active`
        h_prev = None
        cur = 0
        points = [s for s in model.config.exit_points if s >= self.min_exit]
        for e in points:
            ctx = self._ctx(model, cache, pos_all, active, n_new, B)
            h = model.run_steps(cur, e, h, ctx)
            cur = e
            if e == L:
                final = model.logits(h[:, 0])
                out_logits = (
                    final
                    if out_logits is None
                    else out_logits.index_copy(0, torch.as_tensor(active, device=dev), final)
                )
                break
            logits = model.exit_logits(h[:, 0], e)
            conf = confidence(self.measure, logits, model, e, h[:, 0], h_prev)
            h_prev = h[:, 0]
            passed = conf >= lam
            if self.sync_batch:  # naive batching: everyone waits for the least confident row
                live_a = torch.as_tensor(live[active], device=dev)
                passed = passed | ~live_a
                passed = passed.all().expand_as(passed)
            ok = np.array(passed.tolist(), dtype=bool)  # one host sync per exit checked
            if not ok.any():
                continue
            if out_logits is None:
                out_logits = torch.zeros(B, logits.shape[-1], device=dev, dtype=logits.dtype)
            gone = active[ok]
            out_logits[torch.as_tensor(gone, device=dev)] = logits[
                torch.as_tensor(np.nonzero(ok)[0], device=dev)
            ]
            for b in gone:
                depths[b] = e
            if self.deep_kv == "propagate":  # the exit state writes K/V at every skipped step
                keep = torch.as_tensor(np.nonzero(ok)[0], device=dev)
                h_gone = h[keep]
                ctx_gone = self._ctx(model, cache, pos_all, gone, n_new, B)
                for j in range(e, L):
                    model.kv_only_step(j, h_gone, ctx_gone)
            stay = np.nonzero(~ok)[0]
            active = active[~ok]
            if len(active) == 0:
                break
            idx = torch.as_tensor(stay, device=dev)
            h, h_prev = h[idx], h_prev[idx]
        n_live = int(live.sum())
        self.counts["tokens"] += n_live
        self.counts["exited"] += sum(1 for b in rows if live[b] and depths[b] < L)
        self.counts["depth_sum"] += sum(depths[b] for b in rows if live[b])
        return StepOutput(out_logits, depths)

    @staticmethod
    def _ctx(model: Decoder, cache: KVCache, pos_all: Tensor, rows: np.ndarray, n_new, B: int):
        sub = None if len(rows) == B else rows
        nn_ = None if n_new is None else n_new[rows]
        pos = pos_all if sub is None else pos_all[torch.as_tensor(rows, device=pos_all.device)]
        return model.context(pos, cache, rows=sub, n_new=nn_)

    def stats(self) -> dict:
        c = self.counts
        return {
            "threshold": self.threshold,
            "decay_tau": self.tau,
            "min_exit": self.min_exit,
            "sync_batch": self.sync_batch,
            "deep_kv": self.deep_kv,
            "exit_rate": c["exited"] / max(c["tokens"], 1),
            "mean_depth": c["depth_sum"] / max(c["tokens"], 1),
            **c,
        }
