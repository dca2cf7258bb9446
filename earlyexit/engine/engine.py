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

import dataclasses
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from earlyexit.decoding.calm import calm_threshold
from earlyexit.decoding.confidence import DEFAULT_THRESHOLD
from earlyexit.decoding.free import calibration_pairs
from earlyexit.decoding.generate import OutputTracker
from earlyexit.decoding.sampling import SamplingParams, apply_penalties, make_generator
from earlyexit.decoding.speculative import (
    AdaptiveStop,
    DraftGate,
    DraftStop,
    accepted_length,
    batch_keeps,
    draft_cost,
)
from earlyexit.decoding.strategies import OptionError, check_draft, check_exit
from earlyexit.decoding.threshold import BetaMixtureThreshold
from earlyexit.engine.request import (
    DEEP_KV,
    SERVED,
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


@dataclass
class _Round:
    """A speculative request's round in progress: its drafts, their draft probabilities,
    and the chance that all of them pass (the adaptive stop rule's running product)."""

    drafts: list[int] = field(default_factory=list)
    confs: list[float] = field(default_factory=list)
    reach: float = 1.0
    verify_from: int | None = None  # done drafting: the verification waits to start here
    verifying: bool = False


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
        allow_untrained_exits: serve lossy strategies on exits that were never trained.
        measure_draft_cost: price drafts from measured forward times (False: from weight
            bytes only; tests use it to keep decisions independent of the machine).
        draft_gate: when adaptive speculation drafts at all, by measured throughput per
            batch size (:class:`~earlyexit.decoding.speculative.DraftGate`; a rule with
            fixed decisions in tests). Rounds that do not draft run plain: one full-depth
            segment that writes the draft adapter's entry on the way.
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
        allow_untrained_exits: bool = False,
        measure_draft_cost: bool = True,
        draft_gate: DraftGate | None = None,
    ) -> None:
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.allow_untrained_exits = allow_untrained_exits
        self.measure_draft_cost = measure_draft_cost
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
        # adaptive decisions learn per served model (not per request: a request is too short
        # to fit them, and every request's evidence is about the same exits)
        self._calibrators: dict[tuple[int, str], BetaMixtureThreshold] = {}
        self._stop_rules: dict[int, AdaptiveStop] = {}
        self._forward_times: dict[int, float] | None = None
        draft = getattr(model, "draft", None)
        self.draft_head = None
        if draft is not None and draft.vocab is not None:
            self.draft_head = PrunedHead(
                vocabulary_ids(draft.vocab, model.config.vocab_size, "vocab")
            )
        self._pending: dict[str, list[tuple[float, int]]] = {}  # FREE adaptive: (conf, argmax)
        self._spec: dict[str, _Round] = {}  # speculative: the round in progress
        self._starts: list[tuple[int, int]] = []  # (row, token) to embed as next inputs
        self._draft_base: dict[int, float] = {}
        # adaptive speculation drafts only at batch sizes where drafting measured faster
        self.draft_gate = draft_gate if draft_gate is not None else DraftGate()
        # (running, tokens, start, prefill seconds) of the last iteration, for the gate
        self._tick: tuple[int, int, float, float] | None = None
        self._prefill_seconds = 0.0  # this iteration's prefill, not timed by the gate
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
        return ids, params

    def prepare_speculation(self) -> None:
        """Measure now what adaptive speculation's draft prices need (full-depth forwards
        of 1 to 128 single-token rows, 1-4 s on SmolLM2 on 2 cores) rather than inside the
        first speculative request, which would otherwise stall every running request that
        long. A server calls it at start; a no-op for a model that cannot speculate (no
        exit, no draft), with fixed prices, or when already measured."""
        can = getattr(self.model, "draft", None) is not None or self.model.config.exits.steps
        if can and self.measure_draft_cost and self._forward_times is None:
            self._forward_times = self._measure_forwards()

    def resolve_mode(self, exit: ExitMode | None, params: SamplingParams) -> ExitMode | None:
        """Validate a request's :class:`ExitMode` against the model and fill its defaults
        (the same checks and words as ``make_strategy``: ``decoding/strategies.py``).
        Raises :class:`~earlyexit.decoding.strategies.OptionError` naming the option."""
        if exit is None:
            return None
        name = exit.strategy
        if name not in SERVED:
            raise OptionError(
                f"unknown strategy {name!r}; the engine serves full, {', '.join(SERVED)}",
                "strategy",
            )
        allow = self.allow_untrained_exits or self.synthetic is not None
        draft = getattr(self.model, "draft", None)
        from_draft = name == "speculative" and draft is not None
        from_draft = from_draft and exit.step in (None, draft.exit_step)
        if exit.measure == "saturation":
            raise OptionError(
                "the saturation confidence compares an exit's state with the previous exit's; "
                "the engine serves margin, max-prob and classifier",
                "confidence",
            )
        threshold = exit.threshold if name != "speculative" else DEFAULT_THRESHOLD
        step = check_exit(
            self.model,
            name,
            exit.step,
            threshold=threshold,
            measure=exit.measure,
            allow_untrained=allow,
        )
        deep_kv = exit.deep_kv or ("propagate" if name == "calm" else "catch-up")
        kv_ok = {"free": DEEP_KV, "calm": ("propagate", "skip"), "speculative": ("catch-up",)}
        if deep_kv not in kv_ok[name]:
            raise OptionError(
                f"deep_kv for {name} must be one of {', '.join(kv_ok[name])}, got {deep_kv!r}",
                "deep_kv",
            )
        if threshold == "adaptive" and deep_kv != "catch-up":
            raise OptionError(
                "an adaptive threshold is fitted from FREE's catch-ups; it needs deep_kv "
                "'catch-up'",
                "threshold",
            )
        if exit.decay_tau is not None and not (name == "calm" and exit.decay_tau > 0):
            raise OptionError("decay_tau applies to calm and must be > 0", "decay_tau")
        if name == "calm":  # its first check: the first exit point from `step` on (none: never)
            step = next((e for e in self.model.config.exits.steps if e >= step), self.L)
        k, stop = exit.draft_k, exit.draft_stop
        if name == "speculative":
            if params.temperature > 0:
                raise OptionError(
                    "the speculative strategy is greedy-only (it is lossless against greedy "
                    "full-depth decoding); use temperature 0",
                    "temperature",
                )
            if params.presence_penalty or params.frequency_penalty:
                raise OptionError(
                    "the speculative strategy decides tokens itself; presence and frequency "
                    "penalties need another strategy",
                    "presence_penalty" if params.presence_penalty else "frequency_penalty",
                )
            if from_draft:
                k = draft.k if k is None else k
                stop = draft.stop if stop is None else stop
            k, stop = check_draft(k, stop)
        return dataclasses.replace(
            exit, step=step, threshold=threshold, deep_kv=deep_kv, draft_k=k, draft_stop=stop
        )

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
        exit = self.resolve_mode(exit, params)
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
        self._release_verifies()  # it may have been the last one drafting
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
        now = time.perf_counter()
        if self._tick is not None:  # the last iteration's wall time, up to this one
            n, tokens, start, prefill = self._tick
            self.draft_gate.record(n, tokens, now - start - prefill)
            self._tick = None
        out = self.scheduler.schedule()
        self.stats["iterations"] += 1
        self._prefill_seconds = 0.0
        events: list[RequestOutput] = []
        touched: list[str] = []
        running = self.scheduler.num_running
        try:
            self._step(out, events, touched)
        except Exception as e:
            self._starts.clear()
            failed = [self.requests[r] for r in touched]
            for req in failed:
                if not req.finished:
                    self._finish(req, RequestStatus.FINISHED_ERROR)
                self._forget(req.request_id)
            raise StepFailed(failed, e) from e
        for ev in events:
            if ev.finished:  # its last output is delivered now: the engine lets go of it
                self._forget(ev.request_id)
        self._release_verifies()  # a drafting request may have finished or been aborted
        # the gate times every iteration but the prefill in it (and the prompts' first
        # tokens): a prefill costs the same in either mode and lands in an epoch by chance
        # (the largest noise), while the decode work beside it is what the modes differ in
        # (when iterations that admit went untimed, a quarter of them at max batch 16, the
        # gate missed part of drafting's cost)
        if self.has_unfinished() and any(
            self._gated(self.requests[r]) for r in self.scheduler.cursors
        ):
            tokens = max(0, sum(len(ev.new_token_ids) for ev in events) - len(out.admit))
            self._tick = (running, tokens, now, self._prefill_seconds)
        return events

    @staticmethod
    def _gated(req: Request) -> bool:
        """Whether the draft gate decides this request's rounds (adaptive speculation)."""
        e = req.exit
        return e is not None and e.strategy == "speculative" and e.draft_stop == "adaptive"

    def _step(self, out, events: list[RequestOutput], touched: list[str]) -> None:
        if out.admit:
            rids = [rid for rid, _ in out.admit]
            touched += rids
            rows = [row for _, row in out.admit]
            for rid in rids:
                req = self.requests[rid]
                req.status = RequestStatus.RUNNING
                if req.exit is not None and req.exit.threshold == "adaptive":
                    self._calibrator(req.exit).start_sequences(1)  # refit as a request starts
            t = time.perf_counter()
            logits, depths = self.runner.prefill(rows, [self.requests[r].prompt_ids for r in rids])
            self._prefill_seconds = time.perf_counter() - t
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
        if self._starts:  # every continuing request's next input, embedded in one call
            rows, tokens = zip(*self._starts)
            self._starts.clear()
            self.runner.start_tokens(list(rows), list(tokens))

    def _decide(self, rids: list[str], events: list[RequestOutput]) -> None:
        """Segments ended: each request's strategy decides what its result means (an exit
        check, a draft, a verification, or the token at full depth)."""
        if self.mor is not None:
            self._decide_mor(rids, events)
            return
        ends = {r: self.scheduler.cursors[r].end for r in rids}
        spec = [r for r in rids if r in self._spec]
        rest = [r for r in rids if r not in self._spec]
        if spec:
            self._decide_speculative(spec, ends, events)
        if not rest:
            return
        rows = self.scheduler.rows
        steps = [ends[r] for r in rest]
        logits = self.runner.logits([rows[r] for r in rest], steps)
        shallow = [i for i, s in enumerate(steps) if s < self.L]
        go_deep: dict[int, int] = {}  # rest index -> the end of its next segment
        if shallow:
            go_deep = self._decide_exits([rest[i] for i in shallow], shallow, steps, logits)
        self._calibrate([r for r, s in zip(rest, steps) if s == self.L])
        for i, end in go_deep.items():
            r = rest[i]
            if end == self.L:
                self.runner.start_catch_up(rows[r])
            self.scheduler.set_segment(r, steps[i], end)
        emit = [i for i in range(len(rest)) if i not in go_deep]
        if emit:
            # exited tokens: catch-up keeps their states for the deep pass; propagate writes
            # their K/V at the skipped steps now (grouped by exit step); skip leaves nothing.
            # Only catch-up ever stacks, so only rows that finished at full depth have
            # stacks to clear.
            catch_up, propagate = [], {}
            for i in emit:
                if steps[i] < self.L:
                    kv = self.requests[rest[i]].exit.deep_kv
                    if kv == "catch-up":
                        catch_up.append(rows[rest[i]])
                    elif kv == "propagate":
                        propagate.setdefault(steps[i], []).append(rows[rest[i]])
            if catch_up:
                self.runner.push_stack(catch_up)
            for step, prop_rows in propagate.items():
                self.runner.propagate(prop_rows, step)
            self.runner.clear_stack([rows[rest[i]] for i in emit if steps[i] == self.L])
            idx = torch.as_tensor(emit, device=logits.device)
            self._emit([rest[i] for i in emit], logits[idx], [steps[i] for i in emit], events)

    def _decide_exits(
        self, rids: list[str], at: list[int], steps: list[int], logits: torch.Tensor
    ) -> dict[int, int]:
        """Exit checks of ``free`` and ``calm`` requests at their shallow segment ends
        (``logits[at[j]]`` is request ``rids[j]``'s). Returns, for those that go on, the end
        of their next segment: the last step (FREE: over the stack, exact KV) or CALM's next
        exit point."""
        rows = self.scheduler.rows
        conf = torch.empty(len(rids), device=logits.device)
        by_measure: dict[tuple[str, int], list[int]] = {}
        for j, r in enumerate(rids):
            by_measure.setdefault((self.requests[r].exit.measure, steps[at[j]]), []).append(j)
        for (measure, step), js in by_measure.items():
            sel = torch.as_tensor([at[j] for j in js], device=logits.device)
            conf[torch.as_tensor(js, device=logits.device)] = self.runner.confidences(
                measure, [rows[rids[j]] for j in js], step, logits[sel]
            ).to(conf.dtype)
        idx = torch.as_tensor(at, device=logits.device)
        # one host sync for every check: confidences and shallow argmaxes
        host_conf, host_arg = torch.stack([conf, logits[idx].argmax(-1).to(conf.dtype)]).tolist()
        syn = self.synthetic if self.synthetic and self.synthetic.exit_rate is not None else None
        go_deep: dict[int, int] = {}
        for j, r in enumerate(rids):
            req, c = self.requests[r], host_conf[j]
            mode, step = req.exit, steps[at[j]]
            n = len(req.output_ids)
            if syn is not None:
                exits = syn.exits(req.request_id, n)
            elif mode.strategy == "calm":
                exits = c >= calm_threshold(
                    mode.threshold, mode.decay_tau, n, req.params.max_new_tokens
                )
            else:
                exits = c > self._threshold(mode)
            if mode.threshold == "adaptive":  # FREE: every shallow decision, for calibration
                self._pending.setdefault(r, []).append((c, int(host_arg[j])))
            if exits:
                continue
            if mode.strategy == "calm":  # on to the next exit point checked, or the end
                go_deep[at[j]] = next(
                    (e for e in self.model.config.exits.steps if e > step), self.L
                )
            else:
                go_deep[at[j]] = self.L
        return go_deep

    def _threshold(self, mode: ExitMode) -> float:
        return self._calibrator(mode).value if mode.threshold == "adaptive" else mode.threshold

    def _calibrator(self, mode: ExitMode) -> BetaMixtureThreshold:
        key = (mode.step, mode.measure)
        if key not in self._calibrators:
            self._calibrators[key] = BetaMixtureThreshold(initial=DEFAULT_THRESHOLD)
        return self._calibrators[key]

    def _calibrate(self, done: list[str]) -> None:
        """FREE adaptive: requests whose deep pass just ended log (confidence, shallow ==
        deep) for every stacked token and the trigger (``free.calibration_pairs``)."""
        logs = [r for r in done if len(self._pending.get(r, ())) > 1]
        for r in done:
            if r not in logs:
                self._pending.pop(r, None)
        logs = [r for r in logs if not self._calibrator(self.requests[r].exit).frozen]
        if not logs:
            return
        rows = self.scheduler.rows
        deep = self.runner.chunk_argmax([rows[r] for r in logs])
        for r, deep_args in zip(logs, deep):
            pending = self._pending.pop(r)
            confs, labels = calibration_pairs(
                [c for c, _ in pending], [a for _, a in pending], deep_args
            )
            self._calibrator(self.requests[r].exit).observe(confs, labels)

    # ------------------------------------------------------------------ speculation
    def _decide_speculative(
        self, rids: list[str], ends: dict[str, int], events: list[RequestOutput]
    ) -> None:
        """Lossless self-speculation, per request: after the shallow steps, draft one more
        token or stop and verify; after the deep pass over [states, current], accept the
        longest agreeing prefix, emit it and the full model's next token, and roll every KV
        slot back to it. Draft lengths differ per request; verifications of many requests
        share the deep block calls like any other segment."""
        rows = self.scheduler.rows
        verify = [r for r in rids if ends[r] == self.L]
        shallow = [r for r in rids if ends[r] < self.L]
        if verify:
            results = self.runner.chunk_argmax([rows[r] for r in verify])
            for r, verified in zip(verify, results):
                rnd = self._spec.pop(r)
                req = self.requests[r]
                a = accepted_length(rnd.drafts, verified)
                self._draft_stop(req.exit).observe(rnd.confs, a, len(rnd.drafts))
                self.runner.rollback(rows[r], len(rnd.drafts) - a)
                req.drafted += len(rnd.drafts)
                req.accepted += a
                self.stats["drafted"] += len(rnd.drafts)
                self.stats["accepted"] += a
                tokens = [*rnd.drafts[:a], verified[a]]
                self._push(req, tokens, [self.L] * len(tokens), events)
        by_step: dict[int, list[str]] = {}
        chain: dict[int, list[str]] = {}  # exit step -> requests whose next draft goes on
        for r in shallow:
            by_step.setdefault(ends[r], []).append(r)
        for step, group in by_step.items():
            full = [r for r in group if len(self._spec[r].drafts) >= self.requests[r].exit.draft_k]
            ask = [r for r in group if r not in full]
            stop = list(full)
            if full:  # k drafts: this last state only needs its adapter entry
                self.runner.write_adapter_kv([rows[r] for r in full], step)
            keep, keep_tokens = [], []
            adaptive = [r for r in ask if self.requests[r].exit.draft_stop == "adaptive"]
            if adaptive:  # drafting together (speculative.batch_keeps)
                stop_now, go = self._draft_together(adaptive, step)
                stop += stop_now
                keep += [r for r, _ in go]
                keep_tokens += [t for _, t in go]
            fixed = [r for r in ask if r not in adaptive]
            if fixed:  # a fixed floor: each request on its own draft probabilities
                toks, probs = self.runner.draft([rows[r] for r in fixed], step, self._head(step))
                for r, tok, p in zip(fixed, toks.tolist(), probs.tolist()):
                    rnd = self._spec[r]
                    rule = self._draft_stop(self.requests[r].exit)
                    go_r, _ = rule.keeps(len(rnd.drafts), [p], np.array([rnd.reach]))
                    if bool(go_r[0]):
                        rnd.drafts.append(tok)
                        rnd.confs.append(p)
                        keep.append(r)
                        keep_tokens.append(tok)
                    else:
                        stop.append(r)
            if keep:  # the draft becomes the next input; its state waits for the verify
                krows = [rows[r] for r in keep]
                self.runner.push_stack(krows)
                self.runner.start_tokens(krows, keep_tokens)
                chain[step] = keep
            for r in stop:  # ready to verify: held until no speculative row drafts
                self._spec[r].verify_from = step
                self.scheduler.set_segment(r, step, step)  # nothing to run while it waits
        # The drafts' shallow passes run now, in this iteration: a draft chain is
        # speculation's own inner loop (each link needs the decision before it), and an
        # engine iteration per link doubled the iterations of a round (each with its
        # host syncs and, behind the server, a hand-off to the event loop).
        for step, group in chain.items():
            for r in group:
                self.scheduler.set_segment(r, step, step)
                self.requests[r].steps_run += step
            self.runner.run([(rows[r], 0, step) for r in group], one_block=False)
            self._decide_speculative(group, dict.fromkeys(group, step), events)
        self._release_verifies()

    def _draft_together(
        self, rids: list[str], step: int
    ) -> tuple[list[str], list[tuple[str, int]]]:
        """Adaptive drafting of the requests deciding at ``step`` now: all of them draft one
        more token or none (``speculative.batch_keeps``), priced at the current batch. Where
        not even the most confident draft of every row could pay, no draft head runs (the
        floor: then the round is a plain full-depth step; the position's adapter entry is
        still written). Returns (requests that stop, (request, draft) that go on)."""
        rows = self.scheduler.rows
        mode = self.requests[rids[0]].exit
        rule = self._draft_stop(mode).rule
        rnds = [self._spec[r] for r in rids]
        prices = self._draft_prices(step, max(self.requests[r].exit.draft_k for r in rids))
        price = float(np.mean([prices[len(x.drafts)] for x in rnds]))
        reach = np.array([x.reach for x in rnds])
        first = all(not x.drafts for x in rnds)
        if not rule.may_pay(float(reach.mean()), price):
            self.runner.write_adapter_kv([rows[r] for r in rids], step)
            return list(rids), []
        toks, probs = self.runner.draft([rows[r] for r in rids], step, self._head(mode.step))
        p = probs.tolist()
        go, new_reach = batch_keeps(rule, first, np.array(p), reach, price)
        if not go:
            return list(rids), []
        out = []
        for x, r, tok, pr, rc in zip(rnds, rids, toks.tolist(), p, new_reach):
            x.drafts.append(tok)
            x.confs.append(pr)
            x.reach = float(rc)
            out.append((r, tok))
        return [], out

    def _first_draft_can_pay(self, mode: ExitMode) -> bool:
        """Whether a round starting now could draft at all: the floor of
        :meth:`_draft_together` for a round's first draft (reach 1), checked before the
        round splits into shallow and deep segments, so that a round that will not draft
        runs plain instead of as a split round with no drafts."""
        rule = self._draft_stop(mode).rule
        return rule.may_pay(1.0, self._draft_prices(mode.step, mode.draft_k)[0])

    def _release_verifies(self) -> None:
        """Start every held verification at once when no speculative request is drafting.

        Verifications must run together: a deep pass reads all of the deep weights whether
        it verifies one row's drafts or many rows', so rows that verify at different
        iterations each pay a full pass for a few tokens, and batched speculation measured
        0.71-0.76x full depth at max batch 4-16 on SmolLM2 that way. Held together, one deep
        pass verifies every row's drafts, as in lock-step speculation. A row waits at most
        the other rows' remaining drafts (each stops within ``draft_k``)."""
        if any(rnd.verify_from is None for rnd in self._spec.values() if not rnd.verifying):
            return
        rows = self.scheduler.rows
        for r, rnd in self._spec.items():
            if rnd.verify_from is not None and not rnd.verifying:
                # verify: the deep steps over [drafted states, current]
                self.runner.start_catch_up(rows[r])
                self.scheduler.set_segment(r, rnd.verify_from, self.L)
                rnd.verifying = True

    def _head(self, step: int) -> PrunedHead | None:
        draft = getattr(self.model, "draft", None)
        return self.draft_head if draft is not None and draft.exit_step == step else None

    def _draft_stop(self, mode: ExitMode) -> DraftStop:
        """The request's stop rule: a fixed floor, or the adaptive rule shared per served
        model and exit step (starting from the draft's calibration; priced per decision by
        :meth:`_draft_prices`)."""
        if mode.draft_stop != "adaptive":
            return DraftStop(mode.draft_stop)
        rule = self._stop_rules.get(mode.step)
        if rule is None:
            draft = getattr(self.model, "draft", None)
            prior = draft.stop_prior if draft is not None and draft.exit_step == mode.step else None
            # its cost is unused here: _draft_together prices each decision at the batch
            rule = self._stop_rules[mode.step] = AdaptiveStop(0.5, prior=prior)
        return DraftStop(rule=rule)

    def _draft_prices(self, step: int, k: int) -> list[float]:
        """The price of draft i = 0..k-1 in full decode steps of its request at the current
        batch n: its shallow pass and draft head (by weight bytes,
        ``speculative.draft_cost``), plus what one more position per row adds to the
        verification, which all rows run together: (L - l)/L (t((i+2)n) - t((i+1)n)) / t(n),
        t(m) the measured time of a full-depth forward of m single-token rows. At batch 1 a
        position is nearly free (bandwidth-bound); where the token count crosses into the
        compute-bound regime (measured on the Zen 3 VM: 4 -> 8 rows cost 1.7x) it costs
        almost a full step, so drafts shrink as the batch grows. Capped at 0.95."""
        if step not in self._draft_base:
            head = self._head(step)
            n_vocab = None if head is None else len(head)
            self._draft_base[step] = draft_cost(self.model, step, n_vocab, 0.0)
        base = self._draft_base[step]
        n = max(1, self.scheduler.num_running)
        if not self.measure_draft_cost:
            return [min(0.95, base + 0.05)] * k
        t = self._forward_time
        deep = (self.L - step) / self.L
        return [
            min(0.95, base + deep * max(0.0, t((i + 2) * n) - t((i + 1) * n)) / t(n))
            for i in range(k)
        ]

    def _forward_time(self, m: int) -> float:
        """Seconds of one full-depth forward of ``m`` single-token rows: measured once per
        engine at powers of two (median of 3 after a warm-up), interpolated linearly
        between them and extrapolated past the last."""
        if self._forward_times is None:
            self._forward_times = self._measure_forwards()
        ts = self._forward_times
        ns = sorted(ts)
        if m in ts:
            return ts[m]
        lo = max([x for x in ns if x <= m], default=ns[0])
        hi = min([x for x in ns if x > m], default=ns[-1])
        if hi == lo:  # past the last point: the last slope
            lo, hi = ns[-2], ns[-1]
        return ts[lo] + (ts[hi] - ts[lo]) * (m - lo) / (hi - lo)

    @torch.inference_mode()
    def _measure_forwards(self, most: int = 128) -> dict[int, float]:
        """Seconds of one uncached full-depth forward of n single-token rows, n = 1, 2, 4,
        ... up to ``most`` (median of 3, after a warm-up)."""
        m, d = self.model, self.model.config.d_model
        times, n = {}, 1
        while n <= most:
            h = torch.zeros(n, 1, d, device=self.runner.device, dtype=self.runner.hbuf.dtype)
            pos = torch.zeros(n, 1, dtype=torch.long, device=self.runner.device)
            ctx = m.context(pos)
            runs = []
            for _ in range(4):
                t0 = time.perf_counter()
                m.logits(m.run_steps(0, self.L, h, ctx)[:, 0])
                runs.append(time.perf_counter() - t0)
            times[n] = sorted(runs[1:])[1]
            n *= 2
        return times

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
        """Sample one token per request from ``logits`` and push it (:meth:`_push`)."""
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
        for req, tok, depth in zip(reqs, tokens, depths):
            self._push(req, [tok], [depth], events)

    def _push(
        self, req: Request, tokens: list[int], depths: list[int], events: list[RequestOutput]
    ) -> None:
        """Record decided tokens (one, or a verified speculative run) until the request
        stops; then finish it, or start its next token's first segment."""
        tracker = self._trackers[req.request_id]
        p = req.params
        stop_ids = set(p.stop_token_ids or ()) | (
            set() if p.ignore_eos else set(self.model.config.eos_token_ids)
        )
        now = time.monotonic()
        text, reason, pushed = None if tracker.decoder is None else "", None, 0
        for tok, depth in zip(tokens, depths):
            delta, stopped = tracker.push(tok, depth)
            text = None if delta is None else text + delta
            req.output_ids.append(tok)
            req.depths.append(depth)
            req.exited += depth < self.L
            req.first_token_time = req.first_token_time or now
            self.stats["tokens"] += 1
            self.depth_histogram[depth] += 1
            pushed += 1
            if stopped or tok in stop_ids:
                reason = RequestStatus.FINISHED_STOPPED
            elif len(req.output_ids) >= p.max_new_tokens:
                reason = RequestStatus.FINISHED_LENGTH
            if reason is not None:
                break
        if reason is not None:
            tail = self._finish(req, reason)
            text = None if text is None else text + (tail or "")
        else:
            rid = req.request_id
            if self.mor is not None:  # MoR: the prefix, then the router decides
                end = self.mor[0].stop
                self._mor_runs[rid] = 0
            else:
                end = req.exit.step if req.exit is not None else self.L
            if req.exit is not None and req.exit.strategy == "speculative":
                if self._gated(req) and not (
                    self.draft_gate.drafting(self.scheduler.num_running)
                    and self._first_draft_can_pay(req.exit)
                ):
                    # a plain round: the whole depth at once, the draft adapter's entry
                    # written on the way (a later round's drafts attend over it)
                    end = self.L
                    self.runner.fill_adapter_at(self.scheduler.rows[rid], req.exit.step)
                    self.stats["plain_rounds"] += 1
                else:
                    self._spec[rid] = _Round()
            self.scheduler.set_segment(rid, 0, end)
            self._starts.append((self.scheduler.rows[rid], tokens[pushed - 1]))
        events.append(
            RequestOutput(
                req.request_id,
                tokens[:pushed],
                depths[:pushed],
                text,
                req.finished,
                req.status.value if req.finished else None,
                req,
            )
        )

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
        self._pending.pop(request_id, None)
        self._spec.pop(request_id, None)
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

    def queued_layer_steps(self) -> int:
        """The layer steps (block passes) this engine still owes its requests, in the
        accounting of ``Request.steps_run``: a load measured in work, not in requests (the
        cluster router balances replicas by it).

        Each request owes its remaining tokens (``max_new_tokens`` less those generated) at
        the steps per token it has run so far (``steps_run`` per token: exits, catch-ups
        and drafts included), or at full depth before its first token (a prompt's prefill
        counts as its first token's full depth, as in ``steps_run``). Exact for full-depth
        requests that run to ``max_new_tokens``; an estimate for adaptive ones, and an upper
        bound where a request stops early (an end of sequence, a stop string). Safe to call
        from another thread: it reads one snapshot of the request table, changes nothing."""
        owed = 0.0
        for req in list(self.requests.values()):
            if req.finished:
                continue
            n = len(req.output_ids)
            per_token = req.steps_run / n if n else self.L
            owed += max(req.params.max_new_tokens - n, 0) * per_token
        return round(owed)
