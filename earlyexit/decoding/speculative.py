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

import math

import numpy as np
import torch
from torch import Tensor

from earlyexit.decoding.base import StepOutput, Strategy, run_rows
from earlyexit.models.decoder import Decoder
from earlyexit.models.heads import PrunedHead
from earlyexit.models.kernels import linear
from earlyexit.models.kv_cache import KVCache


def frequent_tokens(tokens: np.ndarray, n: int, vocab_size: int | None = None) -> Tensor:
    """The ``n`` most frequent ids of ``tokens`` (a corpus as token ids), most frequent
    first: FR-Spec's draft vocabulary (ties broken by the smaller id)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    vocab_size = vocab_size or int(tokens.max()) + 1
    counts = np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))  # by count desc, then id
    return torch.as_tensor(order[: min(n, vocab_size)], dtype=torch.long)


class AdaptiveStop:
    """When to stop drafting, fitted online from what every verification says for free.

    Each verified draft gives a pair (its draft probability c, accepted or not), counted
    only up to a row's first rejection (later drafts were conditioned on a wrong prefix).
    The acceptance chance a(c) is the posterior mean of a Beta(1, 1) prior per bin of c
    (``bins`` equal bins on [0, 1]), made non-decreasing in c. A row keeps drafting while
    the chance that its whole draft so far is accepted, the product of a(c_i), is at least
    ``cost``: the price of one more draft token in full decode steps (its shallow pass,
    adapter and draft head, plus what it adds to the verification). Drafting token i then
    pays off in expectation: it saves a full step with that probability. Until ``warmup``
    pairs are in, every round proposes at least its first draft, so that a rule whose prior
    says "never draft" still learns.
    """

    def __init__(
        self, cost: float, bins: int = 10, warmup: int = 64, prior: dict | None = None
    ) -> None:
        """``prior``: {"accepted": [...], "total": [...]} per bin, counts to start from (a
        draft's own calibration, ``drafts.py``); its ``bins`` must match."""
        if not 0 < cost < 1:
            raise ValueError(f"the draft cost must be within (0, 1) full steps, got {cost}")
        self.cost, self.bins, self.warmup = float(cost), bins, warmup
        self.accepted = np.zeros(bins)
        self.total = np.zeros(bins)
        if prior is not None:
            acc = np.asarray(prior["accepted"], dtype=np.float64)
            tot = np.asarray(prior["total"], dtype=np.float64)
            if acc.shape != (bins,) or tot.shape != (bins,) or (acc < 0).any() or (acc > tot).any():
                raise ValueError(f"a stop-rule prior needs {bins} bins of 0 <= accepted <= total")
            self.accepted, self.total = acc.copy(), tot.copy()

    def _bin(self, c: np.ndarray) -> np.ndarray:
        return np.minimum((np.asarray(c) * self.bins).astype(np.int64), self.bins - 1)

    def table(self) -> np.ndarray:
        """a(c) per bin (bins,): Beta(1, 1) posterior means, made monotone (running max)."""
        return np.maximum.accumulate((self.accepted + 1) / (self.total + 2))

    def may_pay(self, reach: float, price: float) -> bool:
        """Whether any next draft could pay: the chance ``reach`` that the drafts so far all
        pass, times the best calibrated acceptance, reaches ``price`` (always while the rule
        has fewer than ``warmup`` samples). Where it cannot, no draft head need run."""
        return self.total.sum() < self.warmup or reach * float(self.table()[-1]) >= price

    def acceptance(self, c) -> np.ndarray:
        return self.table()[self._bin(c)]

    def observe(self, confs: list[float], accepted: list[bool]) -> None:
        b = self._bin(np.asarray(confs, dtype=np.float64))
        np.add.at(self.total, b, 1)
        np.add.at(self.accepted, b, np.asarray(accepted, dtype=np.float64))

    def state(self) -> dict:
        return {
            "cost": self.cost,
            "samples": int(self.total.sum()),
            "acceptance_by_bin": [round(float(x), 3) for x in self.table()],
            "accepted": self.accepted.tolist(),
            "total": self.total.tolist(),
        }

    def prior(self, cap: float = 32.0) -> dict:
        """The counts as a prior for later runs, each bin scaled down to at most ``cap``
        samples (so that a new distribution can still move it)."""
        scale = np.minimum(1.0, cap / np.maximum(self.total, 1.0))
        return {
            "accepted": (self.accepted * scale).round(3).tolist(),
            "total": (self.total * scale).round(3).tolist(),
        }


class DraftStop:
    """Whether a row drafts one more token: the one stop rule that lock-step speculation
    (:class:`SelfSpeculative`) and the serving engine share.

    ``stop``: a fixed draft-probability floor (Kangaroo's early stop; 0 never stops before
    ``k``), or ``rule``: an :class:`AdaptiveStop` (then ``stop`` is unused)."""

    def __init__(self, stop: float = 0.0, rule: AdaptiveStop | None = None) -> None:
        self.stop, self.rule = float(stop), rule

    def keeps(self, i: int, p: np.ndarray, reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For draft ``i`` (0-based) with draft probabilities ``p`` (rows,), given each row's
        ``reach`` (the chance that its drafts so far all pass): whether each row proposes it,
        and the new reach."""
        p = np.asarray(p, dtype=np.float64)
        if self.rule is None:
            return p >= self.stop, reach
        reach = reach * self.rule.acceptance(p)
        warm = i == 0 and self.rule.total.sum() < self.rule.warmup
        return (reach >= self.rule.cost) | warm, reach

    def observe(self, confs: list[float], accepted: int, proposed: int) -> None:
        """One row's verified round: the (probability, accepted) pairs up to its first
        rejection (later drafts were conditioned on a wrong prefix)."""
        if self.rule is None or not proposed:
            return
        seen = min(accepted + 1, proposed)
        self.rule.observe(confs[:seen], [i < accepted for i in range(seen)])


def propose(model: Decoder, hn: Tensor, head: PrunedHead | None) -> tuple[Tensor, Tensor]:
    """The draft (B,) and its probability (B,) for exit-normed states ``hn`` (B, d): the
    argmax of the draft head (``head``, a pruned head, or the full head when None)."""
    if head is None:
        logits, ids = linear(hn, model.head_weight()), None  # (B, V)
    else:
        logits, ids = head.logits(model, hn)  # (B, N)
    p, j = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    return (j if ids is None else ids[j]), p


def batch_keeps(
    rule: AdaptiveStop, first: bool, p: np.ndarray, reach: np.ndarray, price: float
) -> tuple[bool, np.ndarray]:
    """Adaptive drafting for rows whose drafts are verified together (the serving engine).

    One more position in a verification that pads every row's chunk to the longest costs
    every row of the batch, whoever drafted it; so rows draft together: all of them propose
    one more draft iff the expected number of them that pass, the mean of each row's
    chance that all its drafts so far pass (``reach`` times the calibrated acceptance of
    the new draft's probability ``p``), is at least ``price`` (the draft's cost in full
    steps per row). ``first``: the round's first draft, always proposed until the rule
    has ``warmup`` samples. Returns the decision and the rows' new reach."""
    reach = np.asarray(reach, dtype=np.float64) * rule.acceptance(np.asarray(p))
    warm = first and rule.total.sum() < rule.warmup
    return bool(warm or reach.mean() >= price), reach


class DraftGate:
    """Whether batched speculation drafts at all at the current batch: decided by measured
    throughput, not by a cost model (the serving engine's floor).

    A price model (:func:`batch_keeps` with measured forward times) misses costs that only
    show in the whole system: splitting every token into a shallow and a deep segment
    doubles the engine's iterations, each with a decision and, behind the server, an event-
    loop hand-off; verification chunks are padded; the kernel a chunk lands on changes with
    its size. So the engine measures: iterations run in *epochs* of ``epoch`` iterations,
    in each of which new speculative rounds either draft (``True``) or run plain
    (``False``: one full-depth segment, the draft adapter's entry written on the way),
    and the gate compares the wall seconds per emitted token of the two modes.

    Comparisons are *paired*, as our benchmarks are: an epoch is compared only with the
    epoch just before it when that one ran the other mode, and the gate keeps, per batch-
    size bucket (powers of two), an exponential average (weight ``decay`` on the newest)
    of log(draft / plain) over such pairs. A machine whose background load changes from
    minute to minute (a shared VM, another process) moves both sides of a pair alike, where
    averages of each mode taken at different times would compare the moments instead of
    the modes. Per bucket the gate runs both modes once (drafting first, unless a smaller
    batch found drafting slower: a larger batch only makes verification dearer), then
    the faster one, and
    re-measures the slower after ``explore`` epochs (two pairs: with the epochs before and
    after it); each re-measurement that confirms the order doubles the interval, up to
    ``max_explore`` (exploring costs what the slower mode loses); when the order changes
    the gate switches and the interval starts again. The first ``settle`` iterations of an
    epoch are not counted (rounds of the previous mode are still finishing); an epoch whose
    bucket changes is dropped. Drafting must beat plain rounds by ``margin`` (5%) to be
    chosen: the estimate rests on a few pairs, and a wrong verdict for drafting costs far
    more than one for plain rounds (a server run at max batch 16 drafted on a 7% paired
    advantage from 4 pairs and ran a round at 0.71x). For the same reason a verdict for
    drafting needs ``min_pairs`` (3) pairs, gathered back to back; one for plain rounds
    needs one (a server measured at 0.84-0.91x full depth at max batch 4-16 with verdicts
    for drafting from 2-3 pairs, and at 1.00x with no drafting at all).

    Pure Python and clock-free: the engine passes each iteration's emitted tokens and wall
    seconds, so the rule is tested with made-up timings. Greedy outputs do not depend on
    it (both modes are lossless); only speed does. ``fixed``: always draft (True) or never
    (False), measuring nothing (tests; ablations)."""

    def __init__(
        self,
        epoch: int = 24,
        settle: int = 4,
        explore: int = 8,
        max_explore: int = 64,
        decay: float = 0.5,
        margin: float = 0.05,
        min_pairs: int = 3,
        fixed: bool | None = None,
    ) -> None:
        if not (epoch > settle >= 0 and 2 <= explore <= max_explore and 0.0 < decay <= 1.0):
            raise ValueError(
                "DraftGate needs epoch > settle >= 0, 2 <= explore <= max_explore, 0 < decay <= 1"
            )
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"DraftGate margin must be in [0, 1), got {margin}")
        self.epoch, self.settle, self.decay = epoch, settle, decay
        self.margin, self.min_pairs = margin, max(1, int(min_pairs))
        self.explore, self.max_explore = explore, max_explore
        self.fixed = fixed
        self.seconds_per_token: dict[int, dict[bool, float]] = {}  # bucket -> mode -> s/token
        self.log_ratio: dict[int, float] = {}  # bucket -> average log(draft / plain), paired
        self.pairs: dict[int, int] = {}
        self.epochs: dict[int, int] = {}  # bucket -> epochs measured
        self._interval: dict[int, int] = {}  # bucket -> epochs between re-measurements
        self._due: dict[int, int] = {}  # bucket -> the epoch count of the next one
        self._serial = 0  # epochs closed or dropped, all buckets: adjacency of a pair
        self._last: tuple[int, int, bool, float] | None = None  # (serial, bucket, mode, rate)
        self._bucket: int | None = None
        self._mode = True
        self._iters, self._tokens, self._seconds = 0, 0, 0.0

    @staticmethod
    def bucket(n: int) -> int:
        """The batch-size bucket of ``n`` running requests: the next power of two."""
        return 1 << max(0, int(n) - 1).bit_length()

    def _best(self, b: int) -> bool | None:
        if b not in self.log_ratio:
            return None
        return self.log_ratio[b] <= math.log(1.0 - self.margin)

    def _proven(self, b: int) -> bool:
        """Whether drafting is the faster mode at bucket ``b`` on enough evidence."""
        return bool(self._best(b)) and self.pairs.get(b, 0) >= self.min_pairs

    def _choose(self, b: int) -> bool:
        best = self._best(b)
        if best is None or (best and not self._proven(b)):
            # no pair here yet, or drafting ahead on fewer than min_pairs pairs: measure
            last = self._last
            if last is not None and last[1] == b:
                return not last[2]  # the other mode, to make a pair
            if best is not None:
                return False  # unproven drafting: start the next pair on the safe side
            # a larger batch only makes verification dearer: start plain where a smaller
            # one found drafting slower, else start drafting
            smaller = [c for c in self.log_ratio if c < b]
            return self._best(max(smaller)) if smaller else True
        return (not best) if self.epochs[b] >= self._due[b] else best

    def drafting(self, n: int) -> bool:
        """Whether a speculative round starting now at ``n`` running requests drafts."""
        if self.fixed is not None:
            return self.fixed
        b = self.bucket(n)
        return self._mode if b == self._bucket else self._choose(b)

    def record(self, n: int, tokens: int, seconds: float) -> None:
        """One engine iteration at ``n`` running requests emitted ``tokens`` in ``seconds``
        of wall time (its step and what the caller did before the next)."""
        if self.fixed is not None:
            return
        b = self.bucket(n)
        if b != self._bucket:  # a new epoch at this bucket (an unfinished one is dropped)
            if self._bucket is not None:
                self._serial += 1
            self._bucket, self._mode = b, self._choose(b)
            self._iters, self._tokens, self._seconds = 0, 0, 0.0
        self._iters += 1
        if self._iters > self.settle:
            self._tokens += tokens
            self._seconds += seconds
        if self._iters < self.epoch:
            return
        self._serial += 1
        if self._tokens:
            self._close(b, self._mode, self._seconds / self._tokens)
        self._mode = self._choose(b)
        self._iters, self._tokens, self._seconds = 0, 0, 0.0

    def _close(self, b: int, mode: bool, rate: float) -> None:
        before = self._best(b)
        est = self.seconds_per_token.setdefault(b, {})
        old = est.get(mode)
        est[mode] = rate if old is None else (1 - self.decay) * old + self.decay * rate
        self.epochs[b] = self.epochs.get(b, 0) + 1
        last, self._last = self._last, (self._serial, b, mode, rate)
        if last is None or last[:2] != (self._serial - 1, b) or last[2] == mode:
            return  # no pair: the epoch before ran elsewhere, or the same mode
        draft, plain = (rate, last[3]) if mode else (last[3], rate)
        x = math.log(draft / plain)
        old_x = self.log_ratio.get(b)
        self.log_ratio[b] = x if old_x is None else (1 - self.decay) * old_x + self.decay * x
        self.pairs[b] = self.pairs.get(b, 0) + 1
        best = self._best(b)
        if best != before or mode != before:
            # the order changed (start the interval again), or the slower mode was just
            # re-measured and the order held (double it)
            gap = self._interval.get(b, self.explore)
            gap = min(2 * gap, self.max_explore) if best == before else self.explore
            self._interval[b] = gap
            self._due[b] = self.epochs[b] + gap

    def state(self) -> dict:
        """Per bucket: seconds per token of each mode (averaged per mode), the paired
        draft / plain ratio the decisions use, pairs and epochs."""
        out = {}
        for b, est in self.seconds_per_token.items():
            row = {("draft" if m else "plain"): s for m, s in est.items()}
            if b in self.log_ratio:
                row["draft_over_plain"] = math.exp(self.log_ratio[b])
            out[b] = row | {"pairs": self.pairs.get(b, 0), "epochs": self.epochs[b]}
        return out


GATES = ("measured", "always", "never")  # the ways of deciding whether a round drafts


def make_gate(name: str) -> DraftGate:
    """The draft gate called ``name``: ``measured`` (:class:`DraftGate`), ``always`` (every
    adaptive round drafts: the rule alone decides its length) or ``never`` (plain rounds
    only, full-depth speed with the draft adapter kept up to date)."""
    if name not in GATES:
        raise ValueError(f"unknown draft gate {name!r}; choose one of {', '.join(GATES)}")
    return DraftGate(fixed={"measured": None, "always": True, "never": False}[name])


def accepted_length(drafts: list[int], verified: list[int]) -> int:
    """How many leading drafts the verifier accepts: d_{i+1} passes iff it equals the full
    model's argmax after the prefix before it (``verified[i]``)."""
    a = 0
    while a < len(drafts) and drafts[a] == verified[a]:
        a += 1
    return a


def draft_cost(
    model, exit_step: int, n_draft_tokens: int | None, verify_share: float = 0.05
) -> float:
    """One draft token's price in full decode steps, from the weights each reads (decoding
    at batch 1 streams the weights): the first ``exit_step`` steps, the exit's adapter and
    norm and its draft head rows, over the whole model's, plus ``verify_share`` for the
    extra position the verification runs (measured on the CPUs here: a 5-token deep pass
    costs 1.1-1.5x a 1-token one)."""
    L = model.n_steps
    body = sum(p.numel() for p in model.blocks.parameters())  # every block's weights once
    per_step = body / max(1, L)  # unrolled steps share blocks; an estimate per step
    exit_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("exit_"))
    V, d = model.config.vocab_size, model.config.d_model
    head = (n_draft_tokens or V) * d
    full = per_step * L + V * d
    return min(0.95, (per_step * exit_step + exit_params + head) / full + verify_share)


class SelfSpeculative(Strategy):
    """Draft up to ``k`` tokens with the exit after ``exit_step`` steps, verify with one deep
    pass.

    ``stop``: a row stops drafting at the first draft whose top-1 probability under the
    draft head is below ``stop`` (Kangaroo's early stop; 0 drafts ``k`` every time), or,
    with ``stop="adaptive"``, the rows still drafting propose one more draft together or
    not at all (:func:`batch_keeps`, the rule the serving engine uses too: the verification
    pads every row to the longest draft, so one row's draft costs them all). The round ends when every row has stopped or drafted ``k``; rows that
    stopped earlier keep computing throwaway drafts until then (one batched call), which are
    never accepted.

    An exit with an attention adapter (``ExitConfig.attention``) keeps its own KV slot: the
    prefill runs the adapter over the prompt's exit states, every shallow pass appends to
    it, and a rollback shrinks it with the others.
    """

    name = "speculative"
    greedy_only = True

    def __init__(
        self,
        exit_step: int,
        k: int = 4,
        draft_tokens: Tensor | None = None,
        stop: float | str = 0.0,
        cost: float | None = None,
        stop_prior: dict | None = None,
    ) -> None:
        self.ls, self.k = exit_step, k
        self.adaptive = stop == "adaptive"
        self.stop = 0.0 if self.adaptive else float(stop)
        self.cost = cost  # AdaptiveStop's price of a draft token (None: estimated at begin)
        self.stop_prior = stop_prior  # AdaptiveStop's starting counts (a draft's calibration)
        self.rule: AdaptiveStop | None = None
        self.cache_slack = k + 1
        self.counts = {"calls": 0, "drafted": 0, "accepted": 0, "emitted": 0}
        self.draft_lengths = np.zeros(k + 1, dtype=np.int64)  # rounds by drafts proposed
        self.draft_tokens = draft_tokens  # (N,) token ids the draft head may propose
        self._draft_head = None if draft_tokens is None else PrunedHead(draft_tokens)

    def begin(self, model: Decoder, cache: KVCache, batch_size: int, max_new_tokens: int) -> None:
        if self.adaptive and self.rule is None:  # kept across generations: it keeps learning
            n = None if self.draft_tokens is None else len(self.draft_tokens)
            self.rule = AdaptiveStop(
                self.cost or draft_cost(model, self.ls, n), prior=self.stop_prior
            )

    def _attention_exit(self, model: Decoder) -> bool:
        i = model.exit_index(self.ls)
        return i is not None and model.exit_attention is not None

    def prefill(
        self, model: Decoder, cache: KVCache, tokens: Tensor, lens: np.ndarray
    ) -> StepOutput:
        if not self._attention_exit(model):
            return super().prefill(model, cache, tokens, lens)
        B, T = tokens.shape
        positions = model.default_positions((B, T), cache)
        ctx = model.context(positions, cache, n_new=lens)
        h = model.run_filling_exits(model.embed(tokens), ctx)  # (B, T, d)
        last = torch.as_tensor(lens - 1, device=h.device)
        h_last = h[torch.arange(B, device=h.device), last]  # (B, d)
        return StepOutput(model.logits(h_last), [model.n_steps] * B)

    def decode(
        self, model: Decoder, cache: KVCache, tokens: Tensor, n_new: np.ndarray | None = None
    ) -> StepOutput:
        B, k, ls, L = tokens.shape[0], self.k, self.ls, model.n_steps
        rows = np.arange(B)
        live = np.ones(B, dtype=bool) if n_new is None else n_new.astype(bool)
        step_new = None if n_new is None else n_new.copy()
        attn = self._attention_exit(model)
        x = tokens
        states, drafts = [], []
        n_drafts = torch.zeros(B, dtype=torch.long)  # drafts each row proposes
        going = torch.tensor(live)  # rows still drafting (a copy: &= must not touch live)
        reach = np.ones(B)  # adaptive: the chance that each row's drafts so far all pass
        confs = []  # (B,) draft probabilities, per draft
        stop = DraftStop(self.stop, self.rule)
        for i in range(k + 1):
            ctx, slot = model.exit_context(ls, cache, n_new=step_new) if attn else (None, None)
            h = run_rows(model, cache, model.embed(x[:, None]), 0, ls, rows, step_new)  # (B,1,d)
            states.append(h)
            if i == k:
                if attn:  # the last state's adapter entry (the next round may start there)
                    model.exit_attention[model.exit_index(ls)].write_kv(h, ctx, slot)
                break
            hn = model.exit_norm(h[:, 0], ls, ctx)  # (B, d)
            x, p = propose(model, hn, self._draft_head)  # (B,) draft d_{i+1} and its probability
            p = p.cpu()
            if self.rule is not None:  # rows verified together draft together
                act = going.numpy().copy()
                go, reach[act] = batch_keeps(
                    self.rule, i == 0, p.numpy()[act], reach[act], self.rule.cost
                )
                going &= go
            else:
                keep, reach = stop.keeps(i, p.numpy(), reach)
                going &= torch.as_tensor(keep)
            confs.append(p)
            if not bool(going.any()):
                break
            drafts.append(x)
            n_drafts += going.long()
        j = len(drafts)  # drafts verified this round (the longest row's)
        chunk = torch.cat(states, dim=1)  # (B, j+1, d)
        deep_new = None if n_new is None else n_new * (j + 1)
        hd = run_rows(model, cache, chunk, ls, L, rows, deep_new)
        verify = model.logits(hd).argmax(-1)  # (B, j+1): the full model's next tokens
        if j:
            draft = torch.stack(drafts, dim=1)  # (B, j)
            agree = (draft == verify[:, :j]).long().cumprod(dim=1).sum(dim=1)  # (B,)
            accepted = torch.minimum(agree, n_drafts)
        else:
            accepted = torch.zeros(B, dtype=torch.long)
        v_host, a_host = verify.tolist(), accepted.tolist()  # one sync
        d_host = draft.tolist() if j else [[] for _ in rows]
        nd_host = n_drafts.tolist()
        if self.rule is not None and j:  # (confidence, accepted) up to each first rejection
            c_host = torch.stack(confs[:j], dim=1).tolist()  # (B, j)
            for b in np.flatnonzero(live):
                stop.observe(c_host[b], a_host[b], nd_host[b])
        out_tokens, out_depths = [], []
        for b in rows:
            a = a_host[b]
            toks = [*d_host[b][:a], v_host[b][a]]
            out_tokens.append(toks)
            out_depths.append([L] * len(toks))
            if live[b]:  # drop the rejected drafts' entries from every KV slot
                cache.lengths[:, b] -= j - a
                self.counts["accepted"] += a
                self.counts["emitted"] += a + 1
                self.counts["drafted"] += nd_host[b]
                self.draft_lengths[nd_host[b]] += 1
        self.counts["calls"] += int(live.sum())
        return StepOutput(None, [L] * B, out_tokens, out_depths)

    def stats(self) -> dict:
        c = self.counts
        return {
            "exit_step": self.ls,
            "k": self.k,
            "stop": "adaptive" if self.adaptive else self.stop,
            **({"stop_rule": self.rule.state()} if self.rule is not None else {}),
            "draft_vocab": None if self.draft_tokens is None else len(self.draft_tokens),
            "acceptance_rate": c["accepted"] / max(c["drafted"], 1),
            "tokens_per_deep_pass": c["emitted"] / max(c["calls"], 1),
            "draft_lengths": self.draft_lengths.tolist(),
            **c,
        }
