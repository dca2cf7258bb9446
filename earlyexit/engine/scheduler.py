"""The scheduler: which requests run which steps in the next iteration. Pure Python.

Each running request has a *cursor*: the next plan step to run and the end of its current
segment (a prefix of a token's steps that ends in a decision: an exit check or the final
logits). The engine sets segments; the scheduler only decides what runs when.

Policies (``policy``):

- ``static``: a batch of up to ``max_batch`` requests is admitted only when the previous
  batch has completely finished; each iteration runs every request's whole segment.
- ``continuous`` (sequence-wise, as vLLM / Orca): free slots are refilled from the queue at
  every iteration; each iteration runs every request's whole segment.
- ``depthwise`` (continuous depth-wise batching, Relaxed Recursive Transformers §5): work
  items are (request, step); each iteration runs *one* block on every ready item whose
  next step uses that block, whichever step (loop) and request it belongs to, so tokens at
  different depths share a block call; free slots are refilled at every iteration. The
  block with the most ready items runs, unless an item has waited ``max_wait`` iterations,
  which bounds every request's wait (no starvation). When every ready item is at the same
  step there is nothing to interleave: they run together up to the nearest segment end in
  one iteration.

Cache rows are allocated here too (host integers), one per running request.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

POLICIES = ("static", "continuous", "depthwise")


@dataclass
class Cursor:
    """Where a running request is: next step to run and the segment's end (exclusive)."""

    step: int = 0
    end: int = 0
    waited: int = 0  # iterations since it last ran (depthwise fairness)

    @property
    def ready(self) -> bool:
        return self.step < self.end


@dataclass
class ScheduleOutput:
    """One iteration's decisions.

    Attributes:
        admit: requests admitted now, to be prefilled this iteration, with their cache rows.
        run: (request, start step, stop step) to execute this iteration.
        block: the one block a depth-wise iteration runs (None otherwise).
    """

    admit: list[tuple[str, int]] = field(default_factory=list)
    run: list[tuple[str, int, int]] = field(default_factory=list)
    block: int | None = None


class Scheduler:
    """Admission, cache rows and per-iteration work selection for one policy."""

    def __init__(
        self, policy: str, max_batch: int, step_blocks: list[int], max_wait: int | None = None
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.policy, self.max_batch, self.step_blocks = policy, max_batch, list(step_blocks)
        n_blocks = max(step_blocks) + 1
        self.max_wait = max_wait if max_wait is not None else 2 * n_blocks
        self.waiting: deque[str] = deque()
        self.cursors: dict[str, Cursor] = {}  # running requests
        self.rows: dict[str, int] = {}
        self.free_rows: list[int] = list(range(max_batch - 1, -1, -1))
        self.iterations = 0

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.cursors)

    def add(self, request_id: str) -> None:
        self.waiting.append(request_id)

    def set_segment(self, request_id: str, start: int, end: int) -> None:
        """The request's next segment runs steps ``start .. end-1`` (set by the engine)."""
        c = self.cursors[request_id]
        c.step, c.end = start, end

    def advance(self, request_id: str, step: int) -> None:
        self.cursors[request_id].step = step

    def finish(self, request_id: str) -> None:
        """Remove a finished (or aborted) request and free its cache row."""
        if request_id in self.cursors:
            del self.cursors[request_id]
            self.free_rows.append(self.rows.pop(request_id))
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(request_id)

    # ------------------------------------------------------------------ policy
    def schedule(self) -> ScheduleOutput:
        """Decide the next iteration: admissions (prefill) and the work to run."""
        self.iterations += 1
        out = ScheduleOutput()
        if self.policy != "static" or not self.cursors:
            while self.waiting and len(self.cursors) < self.max_batch:
                rid = self.waiting.popleft()
                row = self.free_rows.pop()
                self.rows[rid] = row
                self.cursors[rid] = Cursor()
                out.admit.append((rid, row))
        admitted = {rid for rid, _ in out.admit}
        ready = [(rid, c) for rid, c in self.cursors.items() if c.ready and rid not in admitted]
        if not ready:
            return out
        if self.policy in ("static", "continuous"):
            out.run = [(rid, c.step, c.end) for rid, c in ready]
            return out
        # depthwise, every ready item at the same step: nothing to interleave, so they run
        # together to the nearest segment end in one call (as continuous would); one block
        # per iteration would only add per-iteration overhead (half of a batch-1 token on
        # SmolLM2)
        if len({c.step for _, c in ready}) == 1:
            stop = min(c.end for _, c in ready)
            out.run = [(rid, c.step, stop) for rid, c in ready]
            for _, c in ready:
                c.waited = 0
            return out
        # depthwise: one block, every ready item at that block
        by_block: dict[int, list[tuple[str, Cursor]]] = {}
        for rid, c in ready:
            by_block.setdefault(self.step_blocks[c.step], []).append((rid, c))
        starving = [
            (c.waited, self.step_blocks[c.step]) for _, c in ready if c.waited >= self.max_wait
        ]
        if starving:
            block = max(starving)[1]
        else:
            block = max(
                by_block,
                key=lambda b: (len(by_block[b]), max(c.waited for _, c in by_block[b]), -b),
            )
        out.block = block
        chosen = by_block[block]
        out.run = [(rid, c.step, c.step + 1) for rid, c in chosen]
        ran = {rid for rid, _ in chosen}
        for rid, c in ready:
            c.waited = 0 if rid in ran else c.waited + 1
        return out
