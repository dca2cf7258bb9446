"""The choices (and one default) of CLI flags that are constants of the library.

The constants kept in torch-free modules are imported. The others live in modules that
import torch (decoding, engine, models, serve, evaluation), which the parser must not load:
``earlyexit --help`` answers before torch is imported (~3 s of CPU on a small machine). They
are copied here, and ``tests/test_cli_choices.py`` asserts each copy equals the constant
:data:`COPIES` names, so a new strategy or policy fails there until it is offered here.
"""

from __future__ import annotations

from earlyexit.dtypes import DTYPE_CHOICES, DTYPE_NAMES, PRECISIONS
from earlyexit.plan import SHARING_SCHEMES

__all__ = [
    "CONVERSION_SHARING",
    "COPIES",
    "DEEP_KV",
    "DEFAULT_THRESHOLD",
    "DTYPE_CHOICES",
    "DTYPE_NAMES",
    "GATES",
    "INITS",
    "LORA_INITS",
    "MEASURES",
    "POLICIES",
    "PRECISIONS",
    "ROUTINGS",
    "SERVED_MEASURES",
    "SERVED_STRATEGIES",
    "STRATEGIES",
]

# convert recursive --sharing: every scheme but the dense model's
CONVERSION_SHARING = tuple(s for s in SHARING_SCHEMES if s != "none")

STRATEGIES = ("full", "static", "calm", "free", "speculative")
MEASURES = ("margin", "max-prob", "saturation", "classifier")
DEFAULT_THRESHOLD = 0.9
GATES = ("measured", "always", "never")
DEEP_KV = ("catch-up", "propagate", "skip")
POLICIES = ("static", "continuous", "depthwise")
SERVED_STRATEGIES = ("full", "free", "calm", "speculative")
SERVED_MEASURES = ("margin", "max-prob", "classifier")
INITS = ("stepwise", "average", "lower", "random")
LORA_INITS = ("svd", "asvd", "sequential", "zero")
ROUTINGS = ("causal", "topk")

# each copy above -> "module:NAME" of the constant it copies
COPIES = {
    "STRATEGIES": "earlyexit.decoding.strategies:STRATEGIES",
    "MEASURES": "earlyexit.decoding.confidence:MEASURES",
    "DEFAULT_THRESHOLD": "earlyexit.decoding.confidence:DEFAULT_THRESHOLD",
    "GATES": "earlyexit.decoding.speculative:GATES",
    "DEEP_KV": "earlyexit.engine.request:DEEP_KV",
    "POLICIES": "earlyexit.engine.scheduler:POLICIES",
    "SERVED_STRATEGIES": "earlyexit.serve.protocol:SERVED_STRATEGIES",
    "SERVED_MEASURES": "earlyexit.serve.protocol:SERVED_MEASURES",
    "INITS": "earlyexit.models.recursive:INITS",
    "LORA_INITS": "earlyexit.models.recursive:LORA_INITS",
    "ROUTINGS": "earlyexit.evaluation.perplexity:ROUTINGS",
}
