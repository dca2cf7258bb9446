"""Requests and their outputs, as the engine, the scheduler and the server see them.

Everything here is host-side Python: no tensors. A request carries its prompt, its
:class:`SamplingParams`, its decoding mode (full depth, or per-token early exit with a
threshold), the tokens generated so far with the depth each ran, and its status.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from earlyexit.decoding.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # a step that ran it raised (the server answers 500)

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class ExitMode:
    """Per-request early exit (FREE's synchronized parallel decoding, batched by the engine).

    Attributes:
        step: the shallow exit (steps run before the confidence check).
        threshold: exit iff the shallow margin confidence > threshold (1 never exits).
    """

    step: int
    threshold: float = 0.9


@dataclass
class Request:
    """One generation request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    exit: ExitMode | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    text: str | None = None  # the whole output text once finished (None without a tokenizer)
    # block passes actually computed for generated tokens, FREE's catch-up of exited
    # tokens included (the first token counts its L steps of the prefill's last position)
    steps_run: int = 0

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass
class RequestOutput:
    """What one engine step produced for one request (streaming deltas).

    Attributes:
        request_id: the request.
        new_token_ids: tokens generated in this step (usually one).
        new_depths: plan steps each of them ran.
        text: text completed by these tokens (None without a tokenizer).
        finished: whether the request is done; then ``finish_reason`` says why.
        request: the request itself (its full output so far).
    """

    request_id: str
    new_token_ids: list[int]
    new_depths: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None
    request: Request
