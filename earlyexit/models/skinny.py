"""A compiled CPU linear for a few fp32 rows (decode steps of small batches, speculative
verification chunks).

Decoding streams every weight once per step, so a call over 2-4 rows should cost what a
one-row call does. The libraries' small-M GEMMs do not: on the CPUs here oneDNN's and MKL's
fp32 paths cost 1.5-1.8x a one-row call already at 2 rows (BENCHMARKS.md, "drafts"), which is
what made verifying a draft as expensive as decoding it twice. ``csrc/skinny_linear.c``
reads each weight row once and dots it with every input row while it sits in L1; each
output is formed in the same order whatever the number of rows, so a row's result is the
same alone or in a chunk (batch invariance: greedy speculation then equals full-depth
decoding bit for bit on this path).

Where it runs is decided with the other candidates by measurement (``linear_choice.py``).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
from torch import Tensor

from earlyexit.models import decode_kernel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "skinny_linear.c"
MAX_ROWS = 4

_P, _I = ctypes.c_void_p, ctypes.c_int64
_fn = None
_state = "not loaded"


def load():
    """The compiled function (building it on first use), or None."""
    global _fn, _state
    if _fn is not None or _state != "not loaded":
        return _fn
    cc = decode_kernel._compiler()
    try:
        if cc is None:
            raise RuntimeError("no C compiler found (set CC)")
        path = decode_kernel._build(cc, SOURCE)
        fn = ctypes.CDLL(str(path)).ee_skinny_linear
    except (OSError, RuntimeError, decode_kernel.subprocess.SubprocessError) as e:
        _state = f"unavailable: {e}"
        log.warning("skinny linear kernel unavailable, using oneDNN/MKL: %s", e)
        return None
    fn.restype = None
    fn.argtypes = [_P, _I, _P, _P, _P, _I, _I, _I, ctypes.c_int]
    _fn, _state = fn, f"compiled: {path}"
    return _fn


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` through the compiled kernel: CPU fp32, ``weight`` (N, K) and
    ``bias`` contiguous, ``x`` (..., K) with at most a few rows in all."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype)
    _fn(
        x2.data_ptr(), x2.stride(0), weight.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(),
        M, N, K, torch.get_num_threads(),
    )  # fmt: skip
    return y.view(*x.shape[:-1], N)
