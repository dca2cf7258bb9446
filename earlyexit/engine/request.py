"""Requests and their outputs, as the engine, the scheduler and the server see them.

Everything here is host-side Python: no tensors. A request carries its prompt, its
:class:`SamplingParams`, its decoding mode (full depth, or per-token early exit with a
threshold), the tokens generated so far with the depth each ran, and its status.
"""

from __future__ import annotations

import enum
import time
import zlib
from dataclasses import dataclass, field

from earlyexit.decoding.confidence import DEFAULT_THRESHOLD
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


DEEP_KV = ("catch-up", "propagate", "skip")
# the exiting strategies the engine serves per request (None / "full": full depth, or a
# Mixture-of-Recursions model's own routing)
SERVED = ("free", "calm", "speculative")


@dataclass
class ExitMode:
    """Per-request adaptive depth, batched by the engine: which strategy decides each
    token's depth, and its options. The engine validates and resolves it when the request
    arrives (``LLMEngine.check_request``: the model's defaults fill what is None), with the
    same checks and words as ``make_strategy``.

    Attributes:
        step: ``free``: the shallow exit (steps run before the confidence check);
            ``calm``: the first exit point checked; ``speculative``: the exit that drafts.
            None: the model's (the attached draft's for speculative, else its first exit).
        threshold: ``free`` / ``calm``: exit iff the confidence passes it (1 never exits);
            ``free`` also takes ``"adaptive"``: FREE's Beta-mixture estimate, fitted online
            per served model and exit step from every request's catch-ups.
        deep_kv: what an exited token leaves in the steps it skipped, which later tokens
            attend to (None: ``catch-up`` for free, ``propagate`` for calm):

            - ``catch-up`` (FREE's synchronized parallel decoding): its layer-``step``
              state is kept and the skipped steps run on it, together with the next token
              that goes deep: exact KV, but every token eventually runs every step;
            - ``propagate`` (CALM's state propagation): its exit state is written as K/V
              at every skipped step right away (the K/V projections only);
            - ``skip`` (recursion-wise caching, as in MoR): nothing; later tokens attend
              over the entries that exist. Each token runs exactly its own depth, the
              work-conserving setting of the recursive-transformer paper's throughput
              simulation.
        strategy: ``free``, ``calm`` or ``speculative`` (lossless self-speculation: drafts
            from ``step``, one deep pass verifies them; greedy only).
        measure: the confidence (``margin``, ``max-prob``, ``classifier`` where the model
            has exit classifiers).
        draft_k: speculative: the most drafts per round (None: the draft's, else 4).
        draft_stop: speculative: stop drafting below this draft probability, or
            ``"adaptive"`` (None: the draft's, else 0).
        decay_tau: calm: the threshold's decay over the output (None: constant).
    """

    step: int | None = None
    threshold: float | str = DEFAULT_THRESHOLD
    deep_kv: str | None = None
    strategy: str = "free"
    measure: str = "margin"
    draft_k: int | None = None
    draft_stop: float | str | None = None
    decay_tau: float | None = None


@dataclass(frozen=True)
class SyntheticDepth:
    """A *systems* measurement mode: depth decisions drawn from fixed distributions instead
    of the model's confidence or routers, so that the engine's cost can be measured apart
    from any model's quality (``bench depthwise --synthetic``). Every decision still
    computes what the real one computes (the shallow exit's logits and margin, the router's
    scores), so the cost is the real cost; only the outcome is drawn.

    Each draw is a fixed function of (request id, token index, ``seed``): the same requests
    get the same depths under every batching policy.

    Attributes:
        exit_rate: probability that a token exits at its request's exit step (``ExitMode``).
        mor_shares: probabilities that a Mixture-of-Recursions token runs 1, 2, ...
            recursions (one per recursion of the model).
        seed: varies the draws.
    """

    exit_rate: float | None = None
    mor_shares: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from earlyexit.errors import InputError

        if self.exit_rate is not None and not 0 <= self.exit_rate <= 1:
            raise InputError(f"exit_rate must be in [0, 1], got {self.exit_rate}")
        if self.mor_shares is not None and (
            any(x < 0 for x in self.mor_shares) or abs(sum(self.mor_shares) - 1) > 1e-6
        ):
            raise InputError(f"mor_shares must be probabilities summing to 1: {self.mor_shares}")

    def uniform(self, request_id: str, index: int) -> float:
        """A number in [0, 1) fixed by (request, token index, seed)."""
        return zlib.crc32(f"{self.seed}:{request_id}:{index}".encode()) / 2**32

    def exits(self, request_id: str, index: int) -> bool:
        return self.uniform(request_id, index) < self.exit_rate

    def recursions(self, request_id: str, index: int) -> int:
        """How many recursions this token runs (1-based)."""
        u, total = self.uniform(request_id, index), 0.0
        for k, share in enumerate(self.mor_shares, start=1):
            total += share
            if u < total:
                return k
        return len(self.mor_shares)


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
    exited: int = 0  # tokens emitted from an exit (depth below the full model's)
    drafted: int = 0  # speculative: drafts proposed
    accepted: int = 0  # speculative: drafts the full model accepted

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
