"""The engine on its own thread, fed by asyncio handlers (the HTTP server's bridge).

The engine is single-threaded by design. A background thread runs ``engine.step()`` while
work exists and sleeps on a condition otherwise; handlers add and abort requests under a
lock, and receive each request's outputs on an ``asyncio.Queue`` (posted thread-safely to
the handler's event loop). Counters for ``/metrics`` are kept here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass

from earlyexit.engine import ExitMode, LLMEngine
from earlyexit.engine.request import RequestOutput


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _deliver(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, o in items:
        q.put_nowait(o)


class EngineThread:
    """Runs an :class:`LLMEngine` on a daemon thread; thread-safe submit / abort."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lock = threading.Condition()
        self.streams: dict[str, _Stream] = {}
        self.requests_total = 0
        self.failed_total = 0
        self.recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) per step
        self._stop = False
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="earlyexit-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt, params, exit: ExitMode | None) -> tuple[str, asyncio.Queue]:
        """Add a request (validated now: raises InputError / QueueFull) and its output queue."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self.lock:
            if self._error is not None:
                raise RuntimeError(f"the engine stopped: {self._error!r}")
            rid = self.engine.add_request(prompt, params, exit)
            self.streams[rid] = _Stream(loop, q)
            self.requests_total += 1
            self.lock.notify()
        return rid, q

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.engine.abort(request_id)
            self.streams.pop(request_id, None)

    def close(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.engine.has_unfinished():
                    self.lock.wait()
                if self._stop:
                    return
                try:
                    outs = self.engine.step()
                except BaseException as e:  # a bug: fail every waiting client, keep the reason
                    self._error = e
                    outs = []
                    for rid, s in list(self.streams.items()):
                        s.loop.call_soon_threadsafe(s.queue.put_nowait, e)
                        self.engine.abort(rid)
                    self.streams.clear()
                    self.failed_total += 1
                n = sum(len(o.new_token_ids) for o in outs)
                if n:
                    self.recent.append((time.monotonic(), n))
                deliveries = []
                for o in outs:
                    s = self.streams.get(o.request_id)
                    if s is not None:
                        deliveries.append((s, o))
                    if o.finished:
                        self.streams.pop(o.request_id, None)
            # one wake-up of each event loop per engine step, not one per output: every
            # call_soon_threadsafe writes the loop's self-pipe and contends for the GIL
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for s, o in deliveries:
                by_loop.setdefault(s.loop, []).append((s.queue, o))
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(_deliver, items)

    # ------------------------------------------------------------------ metrics
    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(k for t, k in self.recent if now - t <= window)
        return n / window

    def snapshot(self) -> dict:
        with self.lock:
            e = self.engine
            occ = e.occupancy()
            return {
                "tokens_total": e.stats["tokens"],
                "iterations_total": e.stats["iterations"],
                "requests_total": self.requests_total,
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

    ``average_depth`` is the mean number of steps after which each token was decided;
    ``steps_run`` counts the block passes actually computed for the generated tokens,
    including FREE's deep catch-up of exited tokens; ``full_depth_fraction`` is steps_run
    over what full depth would have computed (n_tokens x n_steps).
    """
    n = len(request.output_ids)
    return {
        "prompt_tokens": len(request.prompt_ids),
        "completion_tokens": n,
        "total_tokens": len(request.prompt_ids) + n,
        "steps_run": request.steps_run,
        "average_depth": sum(request.depths) / n if n else 0.0,
        "full_depth_fraction": request.steps_run / (n * n_steps) if n else 0.0,
    }


__all__ = ["EngineThread", "RequestOutput", "output_usage"]
