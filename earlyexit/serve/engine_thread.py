"""The engine on its own thread, fed by asyncio handlers (the HTTP server's bridge).

- Only the engine thread touches the engine. Handlers send it commands (add, abort) through
  an inbox; the lock guards the inbox alone, so a handler never waits for a step.
- A request is validated and its prompt tokenized on a worker thread before it reaches
  the inbox (:meth:`EngineThread.submit`): a long prompt stalls neither the event loop nor
  the engine.
- Each request's outputs go to an :class:`OutputStream`, posted to the handler's event
  loop once per engine step for all of that loop's requests. Outputs that pile up while a
  handler is busy are taken together (one SSE event for all of them).
- A step that raises fails only the requests it ran (their streams get the exception; see
  :class:`~earlyexit.engine.StepFailed`); the engine goes on with the others. After
  ``max_failed_steps`` failed steps in a row the server reports itself unhealthy until a
  step succeeds again; an error outside a step stops the thread for good (every stream,
  and every later request, gets :class:`EngineDead`).
- Finished requests leave every table here when their last output is posted: memory
  stays flat however long the server runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque

from earlyexit.engine import ExitMode, LLMEngine, StepFailed
from earlyexit.engine.request import RequestOutput
from earlyexit.errors import EarlyExitError, InputError

log = logging.getLogger("earlyexit.serve")


class EngineDead(EarlyExitError):
    """The engine thread stopped on an error it cannot recover from (the server answers 503)."""


class OutputStream:
    """One request's outputs on their way to its handler (used on the handler's loop only).

    :meth:`get` returns everything that arrived since the last call: a list of
    :class:`RequestOutput`, possibly ending with an exception (then nothing follows)."""

    __slots__ = ("items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> list:
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


def _post(items: list[tuple[OutputStream, object]]) -> None:
    for stream, item in items:
        stream.put(item)


class EngineThread:
    """Runs an :class:`LLMEngine` on a daemon thread; submit / abort from any event loop.

    Args:
        engine: the engine (touched by this thread only once started).
        max_failed_steps: failed steps in a row after which :attr:`healthy` turns False.
    """

    def __init__(self, engine: LLMEngine, max_failed_steps: int = 3) -> None:
        self.engine = engine
        self.max_failed_steps = max_failed_steps
        self._cv = threading.Condition()  # guards _inbox and _stop only
        self._inbox: list[tuple] = []
        self._stop = False
        self._ids = itertools.count()
        self.streams: dict[str, OutputStream] = {}  # engine thread only
        # counters for /metrics and /health (written by the engine thread only)
        self.requests_total = 0
        self.step_errors_total = 0
        self.failed_in_a_row = 0
        self.last_error: str | None = None
        self.error: BaseException | None = None  # set when the thread stopped on an error
        self.recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) per step
        self.thread = threading.Thread(target=self._main, name="earlyexit-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ handler side
    @property
    def healthy(self) -> bool:
        """Whether the engine serves: its thread runs and the last steps did not all fail."""
        return (
            self.error is None
            and self.thread.is_alive()
            and self.failed_in_a_row < self.max_failed_steps
        )

    def problem(self) -> str | None:
        """Why :attr:`healthy` is False, in one line (None when healthy)."""
        if self.error is not None or not self.thread.is_alive():
            return f"the engine stopped: {self.error!r}"
        if self.failed_in_a_row >= self.max_failed_steps:
            return f"the last {self.failed_in_a_row} engine steps failed: {self.last_error}"
        return None

    async def submit(
        self,
        prompt: str | list[int],
        params,
        exit: ExitMode | None,
        special_tokens: bool = True,
    ) -> tuple[str, OutputStream]:
        """Validate and tokenize (on a worker thread), then queue the request.
        ``special_tokens``: whether the tokenizer adds its own (not for a rendered chat).

        Raises :class:`InputError` for bad input and :class:`EngineDead` if the engine
        stopped. A full queue arrives later, as the stream's first item (QueueFull)."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        loop = asyncio.get_running_loop()
        ids, params = await loop.run_in_executor(
            None, self.engine.check_request, prompt, params, exit, special_tokens
        )
        exit = self.engine.resolve_mode(exit, params)  # host-only checks: a 400 now
        rid = f"http-{next(self._ids)}"  # apart from the engine's own req-N ids
        stream = OutputStream(loop)
        self._send(("add", rid, ids, params, exit, stream))
        return rid, stream

    def abort(self, request_id: str) -> None:
        """Abort a request (its stream ends with a finished 'abort' output)."""
        self._send(("abort", request_id))

    def abort_all(self) -> None:
        """Abort every request in flight (a shutdown deadline)."""
        self._send(("abort_all",))

    def close(self) -> None:
        """Abort what is in flight and stop the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self.thread.join(timeout=10)

    def _send(self, cmd: tuple) -> None:
        with self._cv:
            if self.error is not None:
                raise EngineDead(f"the engine stopped: {self.error!r}")
            self._inbox.append(cmd)
            self._cv.notify()

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside any step: no state can be trusted
            log.exception("the engine thread stopped")
            with self._cv:
                self.error = e
                inbox, self._inbox = self._inbox, []
            dead = EngineDead(f"the engine stopped: {e!r}")
            posts = [(s, dead) for s in self.streams.values()]
            posts += [(cmd[5], dead) for cmd in inbox if cmd[0] == "add"]
            self.streams.clear()
            self._post(posts)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not engine.has_unfinished():
                    self._cv.wait()
                inbox, self._inbox = self._inbox, []
                stop = self._stop
            posts: list[tuple[OutputStream, object]] = []
            for cmd in inbox:
                self._apply(cmd, posts)
            if stop:
                self._abort(list(engine.requests), posts)
                self._post(posts)
                return
            if engine.has_unfinished():
                self._step(posts)
            self._post(posts)

    def _apply(self, cmd: tuple, posts: list) -> None:
        if cmd[0] == "add":
            _, rid, ids, params, exit, stream = cmd
            try:
                self.engine.add_request(ids, params, exit, request_id=rid)
            except InputError as e:  # QueueFull, mostly: the ids were checked already
                posts.append((stream, e))
                return
            self.streams[rid] = stream
            self.requests_total += 1
        elif cmd[0] == "abort":
            self._abort([cmd[1]], posts)
        else:
            self._abort(list(self.engine.requests), posts)

    def _abort(self, rids: list[str], posts: list) -> None:
        for rid in rids:
            req = self.engine.requests.get(rid)
            if req is None or not self.engine.abort(rid):
                continue
            stream = self.streams.pop(rid, None)
            if stream is not None:
                text = "" if req.text is not None else None
                posts.append((stream, RequestOutput(rid, [], [], text, True, "abort", req)))

    def _step(self, posts: list) -> None:
        try:
            outs = self.engine.step()
        except StepFailed as e:
            self.step_errors_total += 1
            self.failed_in_a_row += 1
            self.last_error = f"{type(e.cause).__name__}: {e.cause}"
            log.error("an engine step failed; its requests get an error", exc_info=e.cause)
            for req in e.requests:
                stream = self.streams.pop(req.request_id, None)
                if stream is not None:
                    posts.append((stream, e))
            return
        self.failed_in_a_row = 0
        n = 0
        for o in outs:
            n += len(o.new_token_ids)
            stream = (
                self.streams.pop(o.request_id) if o.finished else self.streams.get(o.request_id)
            )
            if stream is not None:
                posts.append((stream, o))
        if n:
            self.recent.append((time.monotonic(), n))

    @staticmethod
    def _post(posts: list[tuple[OutputStream, object]]) -> None:
        # one wake-up of each event loop per engine step, not one per output: every
        # call_soon_threadsafe writes the loop's self-pipe and contends for the GIL
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in posts:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            # a closed loop has nobody waiting on it any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_post, items)

    # ------------------------------------------------------------------ metrics
    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(k for t, k in list(self.recent) if now - t <= window)
        return n / window

    def snapshot(self) -> dict:
        """Counters for /metrics. Read without a lock: each value is one atomic read of a
        number the engine thread writes, so a snapshot may straddle one step."""
        e = self.engine
        occ = e.occupancy()
        return {
            "tokens_total": e.stats["tokens"],
            "iterations_total": e.stats["iterations"],
            "requests_total": self.requests_total,
            "step_errors_total": self.step_errors_total,
            "healthy": self.healthy,
            "running": occ["running"],
            "waiting": occ["waiting"],
            "block_calls_total": occ["block_calls"],
            "mean_rows_per_block_call": occ["mean_rows_per_block_call"],
            "max_batch": e.scheduler.max_batch,
            "depth_histogram": dict(e.depth_histogram),
            "n_steps": e.L,
        }


def output_usage(request, n_steps: int) -> dict:
    """OpenAI ``usage`` plus compute accounting.

    ``strategy`` is what ran (``full`` for a request without an exit mode);
    ``average_depth`` is the mean number of steps after which each token was decided;
    ``steps_run`` counts the block passes actually computed for the generated tokens,
    including FREE's deep catch-up of exited tokens and speculation's drafts and
    verifications; ``full_depth_fraction`` is steps_run over what full depth would have
    computed (n_tokens x n_steps); ``exited_tokens`` were decided at an exit;
    ``drafted_tokens`` / ``accepted_tokens``: speculation's drafts and those the full model
    accepted.
    """
    n = len(request.output_ids)
    return {
        "prompt_tokens": len(request.prompt_ids),
        "completion_tokens": n,
        "total_tokens": len(request.prompt_ids) + n,
        "strategy": "full" if request.exit is None else request.exit.strategy,
        "steps_run": request.steps_run,
        "average_depth": sum(request.depths) / n if n else 0.0,
        "full_depth_fraction": request.steps_run / (n * n_steps) if n else 0.0,
        "exited_tokens": request.exited,
        "drafted_tokens": request.drafted,
        "accepted_tokens": request.accepted,
    }


__all__ = ["EngineDead", "EngineThread", "OutputStream", "RequestOutput", "output_usage"]
