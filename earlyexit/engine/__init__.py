"""Serving engine: requests, a pure-Python scheduler, a tensor-only runner, the engine."""

from earlyexit.engine.engine import LLMEngine, QueueFull, StepFailed
from earlyexit.engine.request import (
    ExitMode,
    Request,
    RequestOutput,
    RequestStatus,
    SyntheticDepth,
)
from earlyexit.engine.scheduler import POLICIES, Scheduler

__all__ = [
    "POLICIES",
    "ExitMode",
    "LLMEngine",
    "QueueFull",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "Scheduler",
    "StepFailed",
    "SyntheticDepth",
]
