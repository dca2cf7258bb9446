"""Fast paths for hot operations, with a plain PyTorch fallback for everything else.

- :func:`linear`: on CPU, outside autograd, fp32/bf16 matmuls go through oneDNN
  (``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` uses for frozen CPU
  linears). Measured on our 2-core CI machine in one run (BENCHMARKS.md, `decode`): oneDNN's
  GEMV streams the weights at ~35 GB/s where ``F.linear`` (MKL) reaches ~17 GB/s, and at
  batch 8 ~22 vs ~11 GB/s. Decoding is weight-streaming bound, so this is most of our speed.
  Results agree with ``F.linear`` to float rounding (different summation order).
- A few rows (1-4: decode steps of small batches, speculative verification chunks) go
  through ``skinny.py``'s compiled kernel where it measured no slower on this machine: it
  reads each weight once for all rows, and a row's result does not depend on the others.
- Anything needing gradients, other devices and other dtypes use ``F.linear``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit.models import skinny

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@contextlib.contextmanager
def onednn_linear(enabled: bool):
    """Temporarily enable or disable the oneDNN path (benchmarks use it for an ablation)."""
    global _ONEDNN
    before = _ONEDNN
    _ONEDNN = enabled and before
    try:
        yield
    finally:
        _ONEDNN = before


def _onednn_ok(x: Tensor, weight: Tensor) -> bool:
    return (
        _ONEDNN
        and not torch.compiler.is_compiling()  # inductor lowers CPU linears itself
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def _skinny_ok(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    rows = x.numel() // max(1, x.shape[-1])  # checked first: prefill and big batches leave here
    return (
        0 < rows <= skinny.MAX_ROWS
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and (bias is None or bias.is_contiguous())
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and rows in skinny.decided_rows()  # never built or timed here, inside a forward
    )


def prepare_decoding(device: torch.device, dtype: torch.dtype) -> None:
    """Build and choose the decoding kernels for ``device``/``dtype`` now (a machine's first
    call compiles the few-row linear and times it, ~1-2 s; later ones read the cached
    choice). ``KVCache.for_model`` calls it, so every cached decode has it ready; a forward
    never compiles or times anything (until this ran, few rows go through oneDNN)."""
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        skinny.chosen_rows()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias``: a few fp32 rows on CPU inference through the compiled skinny
    kernel where it measured faster (``skinny.py``), other CPU inference through oneDNN,
    everything else through ``F.linear``."""
    global _ONEDNN
    if _skinny_ok(x, weight, bias):
        return skinny.skinny_linear(x, weight, bias)
    if _onednn_ok(x, weight):
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except RuntimeError:  # an unusual build or CPU: fall back for good
            _ONEDNN = False
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
