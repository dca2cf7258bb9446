"""``LLMEngine``: requests in, streaming outputs out; the scheduler decides, the runner runs.

Per request and per token, the engine's host logic decides the next segment of steps:

- full depth: steps 0..L-1, then the final logits;
- early exit (``ExitMode``, FREE's synchronized parallel decoding): steps 0..L_s-1, then the
  shallow exit's margin decides. Above the threshold the shallow token is emitted and the
  layer-L_s state is kept; otherwise the deep steps L_s..L-1 run on [kept states, current]
  (exact deep KV) and the deep model decides the token. With ``ExitMode.deep_kv`` =
  ``propagate`` / ``skip`` an exited token's skipped steps get its exit state's K/V at once
  / nothing, and there is no catch-up (each token runs exactly its own depth).

With the ``depthwise`` policy every step is a separate work item, so items of many requests
at different depths share each block call; with ``static`` or ``continuous`` whole segments
run in lock-step. Greedy outputs equal single-request decoding with the same strategy
(``FullDepth`` / ``FREE``), token for token (tests).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter

import torch

from earlyexit.decoding.generate import OutputTracker
from earlyexit.decoding.sampling import SamplingParams, apply_penalties, make_generator
from earlyexit.engine.request import (
    DEEP_KV,
    ExitMode,
    Request,
    RequestOutput,
    RequestStatus,
    SyntheticDepth,
)
from earlyexit.engine.runner import ModelRunner
from earlyexit.engine.scheduler import Scheduler
from earlyexit.errors import EarlyExitError, InputError
from earlyexit.models.decoder import Decoder
from earlyexit.models.heads import PrunedHead, vocabulary_ids
from earlyexit.tokenizer import Tokenizer


class QueueFull(InputError):
    """The waiting queue is at its limit (the server answers 503)."""


class StepFailed(EarlyExitError):
    """A step raised. Its requests were finished with status ``error`` and their cache rows
    freed; the engine is consistent and can go on stepping the others.

    Attributes:
        requests: the failed requests (those the step admitted or ran).
        cause: the exception the step raised.
    """

    def __init__(self, requests: list[Request], cause: BaseException) -> None:
        super().__init__(f"an engine step failed ({type(cause).__name__}: {cause})")
        self.requests, self.cause = requests, cause


class LLMEngine:
    """A serving engine over one model.

    A request lives in ``requests`` from ``add_request`` until the step that returns its
    final output (or ``abort``): then the engine forgets it, so a long-lived engine holds
    only what is in flight. Keep the :class:`Request` (``RequestOutput.request``, or the
    list ``generate`` returns) to read a finished one.

    Args:
        model: the decoder (eval mode).
        tokenizer: for text prompts, stop strings and text outputs (optional).
        policy: ``static``, ``continuous`` or ``depthwise``.
        max_batch: concurrent requests (cache rows).
        max_len: cache entries per request: prompt + generated tokens must fit.
        max_queue: waiting requests beyond which ``add_request`` raises :class:`QueueFull`.
        synthetic: draw exit and recursion decisions from fixed distributions instead of
            the model (:class:`SyntheticDepth`; a systems measurement, not a quality one).
        exit_vocab: token ids the exits' head covers for every ``ExitMode`` request (a
            pruned head, ``models/heads.py``: the margin is over them and an exited token
            is one of them); None: the full vocabulary.
    """

    def __init__(
        self,
        model: Decoder,
        tokenizer: Tokenizer | None = None,
        policy: str = "depthwise",
        max_batch: int = 32,
        max_len: int | None = None,
        max_queue: int = 4096,
        synthetic: SyntheticDepth | None = None,
        exit_vocab=None,
    ) -> None:
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.L = model.n_steps
        self.max_len = min(max_len or model.config.max_context, model.config.max_context)
        self.max_queue = max_queue
        self.synthetic = synthetic
        # a text prompt longer than this cannot fit: refused before it is tokenized
        self.max_prompt_chars = self.max_len * (tokenizer.max_token_chars if tokenizer else 1)
        self.scheduler = Scheduler(policy, max_batch, [s.block for s in model.plan])
        exit_head = None
        if exit_vocab is not None:
            exit_head = PrunedHead(
                vocabulary_ids(exit_vocab, model.config.vocab_size, "exit_vocab")
            )
        self.runner = ModelRunner(model, max_batch, self.max_len, exit_head)
        self.requests: dict[str, Request] = {}
        self._trackers: dict[str, OutputTracker] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._ids = itertools.count()
        self.stats = Counter()
        self.depth_histogram: Counter[int] = Counter()
        # Mixture-of-Recursions: (prefix steps, recursion step ranges, suffix steps)
        self.mor = None
        if model.routers is not None:
            from earlyexit.models.mor import recursion_ranges

            self.mor = recursion_ranges(model.plan)
            if len(self.mor[0]) == 0:
                raise InputError(
                    "the engine serves MoR models whose first layer is unique (middle_cycle sharing)"
                )
            self._mor_runs: dict[str, int] = {}
            self._mor_choice: dict[str, int] = {}
        self._syn_mor = synthetic is not None and synthetic.mor_shares is not None
        if self._syn_mor and (self.mor is None or len(synthetic.mor_shares) != len(self.mor[1])):
            n = 0 if self.mor is None else len(self.mor[1])
            raise InputError(
                f"mor_shares needs a Mixture-of-Recursions model with {len(synthetic.mor_shares)} "
                f"recursions (this one has {n})"
            )

    # ------------------------------------------------------------------ requests
    def check_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        exit: ExitMode | None = None,
        special_tokens: bool = True,
    ) -> tuple[list[int], SamplingParams]:
        """Validate a request and tokenize its prompt: (token ids, validated params).
        ``special_tokens``: let the tokenizer add its own (BOS...); not for a chat prompt
        rendered by the model's template, which wrote them itself.

        Touches no engine state, so a server may call it from any thread (tokenizing a long
        prompt takes a while; the engine thread should not wait for it). Raises
        :class:`InputError` on bad input. Lengths are checked before tokenizing: a text of
        more than ``max_prompt_chars`` characters or a list of more than ``max_len`` ids
        cannot fit the context."""
        params = (params or SamplingParams()).validate(self.model.config.vocab_size)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer; send token ids")
            if not prompt:
                raise InputError("the prompt is empty")
            if len(prompt) > self.max_prompt_chars:
                raise InputError(
                    f"the prompt has {len(prompt):,} characters, more than fit the context "
                    f"of {self.max_len} tokens"
                )
            ids = self.tokenizer.encode(prompt, add_special_tokens=special_tokens)
        else:
            if len(prompt) > self.max_len:
                raise InputError(
                    f"the prompt has {len(prompt):,} tokens; the context is {self.max_len}"
                )
            ids = [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.model.config.vocab_size:
            raise InputError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        if len(ids) + params.max_new_tokens > self.max_len:
            raise InputError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                f"context of {self.max_len} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer")
        if exit is not None and not (1 <= exit.step < self.L and -1 <= exit.threshold <= 1):
            raise InputError(f"exit step must be in [1, {self.L - 1}] and threshold in [-1, 1]")
        if exit is not None and exit.deep_kv not in DEEP_KV:
            raise InputError(f"deep_kv must be one of {', '.join(DEEP_KV)}, got {exit.deep_kv!r}")
        return ids, params

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        exit: ExitMode | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Raises :class:`InputError` on bad input and
        :class:`QueueFull` when ``max_queue`` requests wait already."""
        ids, params = self.check_request(prompt, params, exit)
        if self.scheduler.num_waiting >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise InputError(f"duplicate request id {rid!r}")
        req = Request(rid, ids, params, exit)
        self.requests[rid] = req
        self._trackers[rid] = OutputTracker(len(ids), self.tokenizer, params.stop)
        self._generators[rid] = make_generator(params.seed, self.runner.device)
        self.scheduler.add(rid)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now, free its slot and forget it; False if unknown (never added,
        or already finished)."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        self._forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.num_waiting > 0 or self.scheduler.num_running > 0

    # ------------------------------------------------------------------ one iteration
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return what each touched request produced.

        If the iteration raises, every request it had started to work on (the admitted ones
        if the prefill raised, else those and the ones it ran) is finished with status
        ``error`` (its cache row freed) and :class:`StepFailed` is raised; the other
        requests are untouched and the next ``step`` serves them."""
        out = self.scheduler.schedule()
        self.stats["iterations"] += 1
        events: list[RequestOutput] = []
        touched: list[str] = []
        try:
            self._step(out, events, touched)
        except Exception as e:
            failed = [self.requests[r] for r in touched]
            for req in failed:
                if not req.finished:
                    self._finish(req, RequestStatus.FINISHED_ERROR)
                self._forget(req.request_id)
            raise StepFailed(failed, e) from e
        for ev in events:
            if ev.finished:  # its last output is delivered now: the engine lets go of it
                self._forget(ev.request_id)
        return events

    def _step(self, out, events: list[RequestOutput], touched: list[str]) -> None:
        if out.admit:
            rids = [rid for rid, _ in out.admit]
            touched += rids
            rows = [row for _, row in out.admit]
            for rid in rids:
                self.requests[rid].status = RequestStatus.RUNNING
            logits, depths = self.runner.prefill(rows, [self.requests[r].prompt_ids for r in rids])
            for rid, depth in zip(rids, depths):
                self.requests[rid].steps_run += depth
            self._emit(rids, logits, depths, events)
        if out.run:
            touched += [rid for rid, _, _ in out.run]
            rows = self.scheduler.rows
            items = [(rows[rid], start, stop) for rid, start, stop in out.run]
            for rid, start, stop in out.run:  # compute accounting: steps x tokens in flight
                self.requests[rid].steps_run += (stop - start) * int(self.runner.hlen[rows[rid]])
            self.runner.run(items, one_block=out.block is not None)
            ended = []
            for rid, _, stop in out.run:
                self.scheduler.advance(rid, stop)
                if stop == self.scheduler.cursors[rid].end:
                    ended.append(rid)
            if ended:
                self._decide(ended, events)

    def _decide(self, rids: list[str], events: list[RequestOutput]) -> None:
        """Segments ended: exit checks at the shallow exit, tokens at the end."""
        if self.mor is not None:
            self._decide_mor(rids, events)
            return
        rows = self.scheduler.rows
        steps = [self.scheduler.cursors[r].end for r in rids]
        logits = self.runner.logits([rows[r] for r in rids], steps)
        shallow = [i for i, (r, s) in enumerate(zip(rids, steps)) if s < self.L]
        go_deep = set()
        if shallow:
            idx = torch.as_tensor(shallow, device=logits.device)
            conf = self.runner.margins(logits[idx]).tolist()  # one host sync for all checks
            syn = (
                self.synthetic if self.synthetic and self.synthetic.exit_rate is not None else None
            )
            for i, c in zip(shallow, conf):
                req = self.requests[rids[i]]
                exits = (
                    syn.exits(req.request_id, len(req.output_ids))
                    if syn
                    else c > req.exit.threshold
                )
                if not exits:
                    go_deep.add(i)
        for i in sorted(go_deep):
            r = rids[i]
            self.runner.start_catch_up(rows[r])
            self.scheduler.set_segment(r, steps[i], self.L)
        emit = [i for i in range(len(rids)) if i not in go_deep]
        if emit:
            # exited tokens: catch-up keeps their states for the deep pass; propagate writes
            # their K/V at the skipped steps now (grouped by exit step); skip leaves nothing.
            # Only catch-up ever stacks, so only rows that finished at full depth have
            # stacks to clear.
            catch_up, propagate = [], {}
            for i in emit:
                if steps[i] < self.L:
                    kv = self.requests[rids[i]].exit.deep_kv
                    if kv == "catch-up":
                        catch_up.append(rows[rids[i]])
                    elif kv == "propagate":
                        propagate.setdefault(steps[i], []).append(rows[rids[i]])
            if catch_up:
                self.runner.push_stack(catch_up)
            for step, prop_rows in propagate.items():
                self.runner.propagate(prop_rows, step)
            self.runner.clear_stack([rows[rids[i]] for i in emit if steps[i] == self.L])
            idx = torch.as_tensor(emit, device=logits.device)
            self._emit([rids[i] for i in emit], logits[idx], [steps[i] for i in emit], events)

    def _decide_mor(self, rids: list[str], events: list[RequestOutput]) -> None:
        """MoR segment ends: route after the prefix and after each recursion, emit at the end."""
        prefix, recs, suffix = self.mor
        rows = self.scheduler.rows
        ends = {r: self.scheduler.cursors[r].end for r in rids}
        done = [r for r in rids if ends[r] == self.L]
        kind = self.model.config.router.kind
        gating = self.model.config.router.gating
        # finish the recursions that just ended (gated updates), then route
        after_rec = {
            r: next(i for i, R in enumerate(recs) if R.stop == ends[r])
            for r in rids
            if ends[r] != self.L and ends[r] != prefix.stop
        }
        if kind == "expert":
            self.runner.finish_recursion([rows[r] for r in after_rec], gating)
        else:
            last = [r for r, i in after_rec.items() if self._mor_choice[r] == i]
            self.runner.finish_recursion([rows[r] for r in last], "token")
        nxt = {r: 0 for r in rids if ends[r] == prefix.stop}  # recursion to consider next
        nxt.update({r: i + 1 for r, i in after_rec.items()})
        go, stop = [], []
        if kind == "token":
            first = [r for r, i in nxt.items() if i == 0]
            if first:
                choice = self.runner.route_depth([rows[r] for r in first]).tolist()
                if self._syn_mor:  # drawn instead (the router still ran: same cost)
                    choice = [self._drawn_recursions(r) - 1 for r in first]
                self._mor_choice.update(zip(first, choice))
            for r, i in nxt.items():
                (go if i < len(recs) and self._mor_choice[r] >= i else stop).append(r)
        else:
            by_rec: dict[int, list[str]] = {}
            for r, i in nxt.items():
                if i < len(recs):
                    by_rec.setdefault(i, []).append(r)
                else:
                    stop.append(r)
            for i, group in by_rec.items():
                z = self.runner.route([rows[r] for r in group], i)
                keep = (
                    [True] * len(group)
                    if self.model.config.capacities[i] >= 1
                    else (z > 0).tolist()
                )
                if self._syn_mor:  # drawn instead (the router still ran: same cost)
                    keep = [self._drawn_recursions(r) > i for r in group]
                for r, k in zip(group, keep):
                    (go if k else stop).append(r)
        for r in go:
            i = nxt[r]
            self._mor_runs[r] += 1
            self.scheduler.set_segment(r, recs[i].start, recs[i].stop)
        for r in stop:
            self.scheduler.set_segment(r, suffix.start, self.L)
        if done:
            logits = self.runner.logits([rows[r] for r in done], [self.L] * len(done))
            depths = [len(prefix) + len(suffix) + self._mor_runs[r] * len(recs[0]) for r in done]
            self._emit(done, logits, depths, events)

    def _drawn_recursions(self, rid: str) -> int:
        req = self.requests[rid]
        return self.synthetic.recursions(req.request_id, len(req.output_ids))

    def _emit(
        self, rids: list[str], logits: torch.Tensor, depths: list[int], events: list[RequestOutput]
    ) -> None:
        """Sample one token per request, record it, start its next segment or finish it."""
        reqs = [self.requests[r] for r in rids]
        logits = apply_penalties(
            logits,
            [q.output_ids for q in reqs],
            [q.params.presence_penalty for q in reqs],
            [q.params.frequency_penalty for q in reqs],
        )
        tokens = self.runner.sample(
            logits, [q.params for q in reqs], [self._generators[r] for r in rids]
        ).tolist()
        now = time.monotonic()
        cont_rows, cont_tokens = [], []
        for req, tok, depth in zip(reqs, tokens, depths):
            tracker = self._trackers[req.request_id]
            text, stopped = tracker.push(tok, depth)
            req.output_ids.append(tok)
            req.depths.append(depth)
            req.first_token_time = req.first_token_time or now
            self.stats["tokens"] += 1
            self.depth_histogram[depth] += 1
            p = req.params
            stop_ids = set(p.stop_token_ids or ()) | (
                set() if p.ignore_eos else set(self.model.config.eos_token_ids)
            )
            reason = None
            if stopped or tok in stop_ids:
                reason = RequestStatus.FINISHED_STOPPED
            elif len(req.output_ids) >= p.max_new_tokens:
                reason = RequestStatus.FINISHED_LENGTH
            if reason is not None:
                tail = self._finish(req, reason)
                text = None if text is None else text + (tail or "")
            else:
                cont_rows.append(self.scheduler.rows[req.request_id])
                cont_tokens.append(tok)
                if self.mor is not None:  # MoR: the prefix, then the router decides
                    end = self.mor[0].stop
                    self._mor_runs[req.request_id] = 0
                else:
                    end = req.exit.step if req.exit is not None else self.L
                self.scheduler.set_segment(req.request_id, 0, end)
            events.append(
                RequestOutput(
                    req.request_id,
                    [tok],
                    [depth],
                    text,
                    req.finished,
                    req.status.value if req.finished else None,
                    req,
                )
            )
        if cont_rows:
            self.runner.start_tokens(cont_rows, cont_tokens)

    def _finish(self, req: Request, status: RequestStatus) -> str | None:
        req.status = status
        req.finish_time = time.monotonic()
        if req.request_id in self.scheduler.rows:
            self.runner.release(self.scheduler.rows[req.request_id])
        self.scheduler.finish(req.request_id)
        self._generators.pop(req.request_id, None)
        tracker = self._trackers[req.request_id]
        tail = tracker.finish(status.value)
        req.text = tracker.result.text
        return tail

    def _forget(self, request_id: str) -> None:
        """Drop a finished request's bookkeeping (the caller keeps the Request if it wants)."""
        self.requests.pop(request_id, None)
        self._trackers.pop(request_id, None)
        self._generators.pop(request_id, None)
        if self.mor is not None:
            self._mor_runs.pop(request_id, None)
            self._mor_choice.pop(request_id, None)

    # ------------------------------------------------------------------ offline use
    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | None = None,
        exit: ExitMode | None = None,
    ) -> list[Request]:
        """Add every prompt, run until all finish, return the requests in prompt order."""
        reqs = [self.requests[self.add_request(p, params, exit)] for p in prompts]
        while self.has_unfinished():
            self.step()
        return reqs

    def occupancy(self) -> dict:
        """Running / waiting requests and the mean rows per block call so far."""
        r = self.runner
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "block_calls": r.block_calls,
            "mean_rows_per_block_call": r.block_rows / max(r.block_calls, 1),
        }
