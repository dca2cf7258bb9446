"""earlyexit: adaptive-depth inference for decoder-only LLMs.

FREE early exit, Relaxed Recursive Transformers and Mixture-of-Recursions over one
depth-plan model core. Public API::

    import earlyexit
    lm = earlyexit.load("DIR")            # earlyexit checkpoint or Hugging Face directory
    out = lm.generate("def main(", max_new_tokens=32)
    print(out.text, out.depths)
"""

from earlyexit.api import LM, generate, load
from earlyexit.config import ModelConfig
from earlyexit.decoding.generate import GenerationResult, TokenEvent
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.errors import EarlyExitError

__version__ = "0.1.0"
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
