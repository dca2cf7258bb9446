"""earlyexit: adaptive-depth inference for decoder-only LLMs.

FREE early exit, Relaxed Recursive Transformers and Mixture-of-Recursions over one
depth-plan model core. Public API::

    import earlyexit
    lm = earlyexit.load("DIR")            # earlyexit checkpoint or Hugging Face directory
    out = lm.generate("def main(", max_new_tokens=32)
    print(out.text, out.depths)

The names below are imported on first use (PEP 562), not with the package: ``earlyexit
--help`` and ``--version`` then answer without importing torch (~3 s of CPU on a small
machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "LM": "earlyexit.api",
    "generate": "earlyexit.api",
    "load": "earlyexit.api",
    "ModelConfig": "earlyexit.config",
    "GenerationResult": "earlyexit.decoding.generate",
    "TokenEvent": "earlyexit.decoding.generate",
    "SamplingParams": "earlyexit.decoding.sampling",
    "EarlyExitError": "earlyexit.errors",
}
__all__ = [
    "LM",
    "EarlyExitError",
    "GenerationResult",
    "ModelConfig",
    "SamplingParams",
    "TokenEvent",
    "__version__",
    "generate",
    "load",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from earlyexit.api import LM, generate, load
    from earlyexit.config import ModelConfig
    from earlyexit.decoding.generate import GenerationResult, TokenEvent
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.errors import EarlyExitError


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'earlyexit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
