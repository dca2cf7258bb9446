"""FREE: shallow-deep early exit with synchronized parallel decoding (arXiv 2310.05424 §3).

Decoder-only and batched (the official code is T5 and batch 1). Per row:

- Every token runs the shallow steps 0..L_s-1, so the shallow KV is always complete.
- If the shallow exit's confidence is > lambda, its token is emitted and the layer-L_s
  residual state is pushed on the row's stack S; the deep KV lags by |S|.
- Otherwise one deep pass runs steps L_s..L-1 on [S, current] (original positions, causal
  inside the chunk, full view of the deep past): it fills the missing deep KV *exactly*
  and the current token is decided by the deep model. S is cleared.

All rows that go deep in a step share **one** batched deep call: their chunks are
right-padded to the longest stack (``n_new`` per row), so there is no per-row Python loop
and one host sync per step (the exit decisions). Finished rows ride along without writing.
Invariant per row: deep length + |S| = shallow length.

With ``adaptive=True`` the threshold is FREE's Beta-mixture estimate (``threshold.py``),
fed with (confidence, shallow == deep argmax) pairs from every deep pass over a stack.

**Batch fallback** (``min_sync_rate``). In lock-step batched decoding a step saves depth
only when *every* live row exits (otherwise the deep pass runs anyway, on chunks padded to
the longest stack, after a shallow head for every row): with a per-row exit rate p, a batch
of B rows skips the deep pass in ~p^B of its steps, and measured on the embedded model
batched FREE ran at 0.56-0.65x of full depth at batch 8-32. So with ``min_sync_rate`` set
and at least 2 live rows, the strategy counts the steps whose deep pass was skipped among
the first ``probe_steps``; as soon as that share can no longer reach ``min_sync_rate`` it
stops exiting for the rest of the generation
(pending stacks are caught up on the next step, then every step is a plain full-depth step
with no shallow head) and says so in :meth:`stats` (``fallback``). The decision depends on
the outputs only, never on timing, so it is reproducible; it does make a batched row's
output depend on its batch-mates (full depth instead of exits): quality can only go up.

**Synchronized batch exits** (``sync_batch``). In a lock-step batch a row that exits
alone saves nothing: the deep pass runs anyway for its batch-mates, and the exited token's
deep KV is computed in the next deep pass all the same (a chunk padded for every row), so
a lone exit costs quality and padding and buys no depth. With ``sync_batch=True`` a step
exits only when every live row is confident; otherwise every row goes deep. The steps
that skip the deep pass are then exactly those per-row exits would skip (all rows
exit), every live row's stack has the same length (catch-up chunks need no padding), and
tokens a lone exit would have taken from the shallow head come from the full model. A
batch of one is unaffected. ``make_strategy`` turns it on for lock-step ``free``; the
class default is per-row (each row decided as if alone, the paper's per-sequence rule).

**Pruned exit head** (``exit_vocab``): the shallow exit's logits cover only those token ids
(e.g. the corpus's most frequent 8k: ``models/heads.py``); the margin is over them and an
exited token is one of them. A token that goes deep is decided by the full head as always.
At SmolLM2's vocabulary the full head weighs as much as 8 of 30 layers, so this is what
lets an exit after 10 layers cost ~11 rather than ~18 layers' worth.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy, run_rows
from earlyexit.decoding.confidence import DEFAULT_THRESHOLD, confidence
from earlyexit.decoding.threshold import BetaMixtureThreshold
from earlyexit.models.decoder import Decoder
from earlyexit.models.heads import PrunedHead
from earlyexit.models.kv_cache import KVCache


def calibration_pairs(
    confs: list[float], shallow: list[int], deep: list[int]
) -> tuple[list[float], list[int]]:
    """FREE's calibration samples from one synchronized deep pass (``threshold.py``): for
    each position of the chunk (the stacked exited tokens, then the trigger), its shallow
    confidence and whether the shallow argmax equals the deep argmax there. A pass over an
    empty stack (the trigger alone) logs nothing. Lock-step FREE and the engine both log
    through this."""
    if len(confs) < 2:
        return [], []
    return list(confs), [int(s == t) for s, t in zip(shallow, deep)]


class FREE(Strategy):
    """Shallow-deep decoding with synchronized parallel decoding.

    Args:
        exit_step: L_s, steps of the shallow model (an exit point of the model).
        threshold: lambda (exit iff confidence > lambda); the initial value when adaptive.
        adaptive: fit lambda online with the Beta mixture.
        measure: confidence measure (``margin`` as in FREE, ``max-prob``, ``classifier``).
        calibrator: a shared :class:`BetaMixtureThreshold` (kept across generations).
        min_sync_rate: batch fallback (module docstring): the least share of steps, over the
            first ``probe_steps`` with >= 2 live rows, whose deep pass was skipped; below it
            the generation continues at full depth. None: never fall back.
        probe_steps: how many batched steps the fallback decision looks at.
        exit_vocab: token ids (N,) the shallow exit's head covers (a pruned head); None:
            the full vocabulary.
        sync_batch: exit a lock-step step only when every live row is confident (module
            docstring); False: each row exits on its own confidence.
    """

    name = "free"

    def __init__(
        self,
        exit_step: int,
        threshold: float = DEFAULT_THRESHOLD,
        adaptive: bool = False,
        measure: str = "margin",
        calibrator: BetaMixtureThreshold | None = None,
        min_sync_rate: float | None = None,
        probe_steps: int = 8,
        exit_vocab: Tensor | None = None,
        sync_batch: bool = False,
    ) -> None:
        if min_sync_rate is not None and not 0.0 <= min_sync_rate <= 1.0:
            raise ValueError(f"min_sync_rate must be within [0, 1], got {min_sync_rate}")
        if probe_steps < 1:
            raise ValueError(f"probe_steps must be >= 1, got {probe_steps}")
        self.min_sync_rate, self.probe_steps = min_sync_rate, probe_steps
        self.sync_batch = sync_batch
        self.exit_head = None if exit_vocab is None else PrunedHead(exit_vocab)
        self.ls, self.threshold, self.adaptive, self.measure = (
            exit_step,
            threshold,
            adaptive,
            measure,
        )
        self.calibrator = calibrator or (
            BetaMixtureThreshold(initial=threshold) if adaptive else None
        )
        # plain_steps: decode steps needing no synchronization (no live row exited or had
        # states pending), run as one full-depth pass without the stack
        self.counts = {
            "tokens": 0,
            "shallow": 0,
            "deep_passes": 0,
            "caught_up": 0,
            "plain_steps": 0,
            "outvoted": 0,  # confident rows sent deep because a batch-mate was not
        }
        self.fallback: str | None = None  # why this generation went to full depth, if it did

    @property
    def current_threshold(self) -> float:
        return self.calibrator.value if self.adaptive else self.threshold

    def begin(self, model: Decoder, cache: KVCache, batch_size: int, max_new_tokens: int) -> None:
        d = model.config.d_model
        p = model.tok_embeddings.weight
        cap = cache.max_len + 1
        self.stack = torch.zeros(batch_size, cap, d, device=p.device, dtype=p.dtype)  # S per row
        self.n_stack = np.zeros(batch_size, dtype=np.int64)
        self.stack_conf: list[list[float]] = [[] for _ in range(batch_size)]
        self.stack_arg: list[list[int]] = [[] for _ in range(batch_size)]
        if self.adaptive:
            self.calibrator.start_sequences(batch_size)
        self.fallback = None
        self._probe = [0, 0]  # batched steps seen, of which the deep pass was skipped

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B = tokens.shape[0]
        L, ls = model.n_steps, self.ls
        rows = np.arange(B)
        live = np.ones(B, dtype=bool) if n_new is None else n_new.astype(bool)
        if self.fallback is not None and not self.n_stack[live].any():
            # fallen back, stacks caught up: a plain full-depth step, no shallow head
            hd = run_rows(model, cache, model.embed(tokens[:, None]), 0, L, rows, n_new)
            self.counts["tokens"] += int(live.sum())
            self.counts["deep_passes"] += int(live.sum())
            self.counts["plain_steps"] += 1
            return StepOutput(model.logits(hd[:, 0]), [L] * B)
        h = run_rows(model, cache, model.embed(tokens[:, None]), 0, ls, rows, n_new)[:, 0]  # (B, d)
        lam = self.current_threshold
        if self.fallback is not None:  # catching up the stacks: every live row goes deep
            logits = torch.zeros(B, model.config.vocab_size, device=h.device, dtype=h.dtype)
            host = [[0.0] * B]
        elif self.measure == "classifier" and not self.adaptive:
            # The classifier decides from the hidden state alone, so only exiting rows pay
            # for the shallow LM head (at d=256, vocab 8192 the head costs 2.7 blocks).
            conf = confidence("classifier", None, model, ls, h)
            host = [(conf > lam).float().tolist()]  # the one host sync of the step
            ex = np.nonzero(np.array(host[0], dtype=bool) & live)[0]
            if self.sync_batch and len(ex) < live.sum():
                ex = ex[:0]  # outvoted below: no exit head to pay for
            logits = torch.zeros(B, model.config.vocab_size, device=h.device, dtype=h.dtype)
            if len(ex):
                ex_t = torch.as_tensor(ex, device=h.device)
                logits[ex_t] = model.exit_logits(h[ex_t], ls, self.exit_head)
        else:
            logits = model.exit_logits(h, ls, self.exit_head)  # (B, V)
            conf = confidence(self.measure, logits, model, ls, h)
            # the one host sync of the step: decisions, confidences and shallow argmaxes
            host = torch.stack(
                [(conf > lam).float(), conf.float(), logits.argmax(-1).float()]
            ).tolist()
        exits = np.array(host[0], dtype=bool) & live
        outvoted = None
        if self.sync_batch and exits.any() and not exits[live].all():
            outvoted, exits = exits, np.zeros_like(exits)  # nobody exits alone
            self.counts["outvoted"] += int(outvoted.sum())
        deep = ~exits & live
        depths = [ls if e else L for e in exits]
        self.counts["tokens"] += int(live.sum())
        self.counts["shallow"] += int(exits.sum())
        if self.min_sync_rate is not None and self.fallback is None and live.sum() >= 2:
            self._probe[0] += 1
            self._probe[1] += int(not deep.any())
            seen, skipped = self._probe
            # decided as soon as the share over the probe can no longer reach the floor
            # (at batch 8+ that is usually just past half the probe), so the probe's
            # overhead is paid for as few steps as the decision allows
            best = skipped + max(self.probe_steps - seen, 0)
            if seen <= self.probe_steps and best < self.min_sync_rate * self.probe_steps:
                self.fallback = (
                    f"full depth after {seen} batched steps: the deep pass was skipped in "
                    f"{skipped}, so fewer than {self.min_sync_rate:.0%} of the first "
                    f"{self.probe_steps} could skip it and exits could not pay"
                )

        if not exits.any() and not self.n_stack[live].any():
            # nothing exits and no live row has states pending (a finished row's stack is
            # never caught up, so it must not count): a plain full-depth step, no stacking
            hd = run_rows(model, cache, h[:, None], ls, L, rows, n_new)
            self.counts["deep_passes"] += int(live.sum())
            self.counts["plain_steps"] += 1
            out = model.logits(hd[:, 0])
            if outvoted is not None and self.adaptive and not self.calibrator.frozen:
                # the confident rows a batch-mate sent deep: what exiting would have given
                ov = np.nonzero(outvoted)[0]
                deep_arg = out[torch.as_tensor(ov, device=out.device)].argmax(-1).tolist()
                self.calibrator.observe(
                    [host[1][b] for b in ov], [int(host[2][b] == t) for b, t in zip(ov, deep_arg)]
                )
            return StepOutput(out, depths)

        # push exited rows' layer-L_s states (and write the deep rows' current state too:
        # it becomes the last element of their chunk)
        push = rows[live]
        idx = torch.as_tensor(push, device=h.device)
        self.stack[idx, torch.as_tensor(self.n_stack[push], device=h.device)] = h[idx]
        if self.adaptive:
            for b in rows[exits]:
                self.stack_conf[b].append(host[1][b])
                self.stack_arg[b].append(int(host[2][b]))
        self.n_stack[push] += 1

        if deep.any():
            d_rows = rows[deep]
            n = self.n_stack[d_rows]  # chunk lengths: |S| + the current token
            chunk = self.stack[
                torch.as_tensor(d_rows, device=h.device), : int(n.max())
            ]  # (D, Tmax, d)
            hd = run_rows(model, cache, chunk, ls, L, d_rows, n)  # writes |S|+1 deep KV rows each
            last = torch.as_tensor(n - 1, device=h.device)
            d_idx = torch.arange(len(d_rows), device=h.device)
            logits = logits.clone()
            logits[torch.as_tensor(d_rows, device=h.device)] = model.logits(hd[d_idx, last])
            self.counts["deep_passes"] += len(d_rows)
            self.counts["caught_up"] += int((n - 1).sum())
            if self.adaptive and not self.calibrator.frozen and self.fallback is None:
                self._calibrate(model, hd, d_rows, n, host)
            self.n_stack[d_rows] = 0
            for b in d_rows:
                self.stack_conf[b].clear()
                self.stack_arg[b].clear()
        return StepOutput(logits, depths)

    def _calibrate(
        self, model: Decoder, hd: Tensor, d_rows: np.ndarray, n: np.ndarray, host
    ) -> None:
        """Log (confidence, shallow == deep) for every stacked token and the trigger."""
        has_stack = n > 1
        if not has_stack.any():
            return  # deep passes over an empty stack log nothing
        deep_arg = (
            model.logits(hd[torch.as_tensor(np.nonzero(has_stack)[0], device=hd.device)])
            .argmax(-1)
            .tolist()
        )
        confs, labels = [], []
        for j, b in enumerate(d_rows[has_stack]):
            k = int(n[np.nonzero(has_stack)[0][j]])
            c, y = calibration_pairs(
                [*self.stack_conf[b], host[1][b]],
                [*self.stack_arg[b], int(host[2][b])],
                deep_arg[j][:k],
            )
            confs += c
            labels += y
        self.calibrator.observe(confs, labels)

    def stats(self) -> dict:
        c = self.counts
        out = {
            "exit_step": self.ls,
            "threshold": self.current_threshold,
            "exit_rate": c["shallow"] / max(c["tokens"], 1),
            "exit_vocab": None if self.exit_head is None else len(self.exit_head),
            "sync_batch": self.sync_batch,
            **c,
            "fallback": self.fallback,
        }
        if self.adaptive:
            out["calibrator"] = self.calibrator.state()
        return out
