"""A compiled CPU linear for a few rows (decode steps of small batches, speculative
verification chunks), chosen by measurement on the machine that runs it.

Decoding streams every weight once per step, so a call over 2-4 rows should cost what a
one-row call does. The libraries' small-M GEMMs do not: on the CPUs here oneDNN's and MKL's
fp32 paths cost 1.5-1.8x a one-row call already at 2 rows (BENCHMARKS.md, "drafts"), which is
what made verifying a draft as expensive as decoding it twice. ``csrc/skinny_linear.c``
reads each weight row once and dots it with every input row while it sits in L1; each
output is formed in the same order whatever the number of rows, so a row's result is the
same alone or in a chunk (batch invariance: greedy speculation then equals full-depth
decoding bit for bit on this path).

Which rows counts use it is measured once per machine (CPU flags, torch version, threads),
when a decode cache is first made (``kernels.prepare_decoding``; never inside a forward):
both kernels time a pass over weights larger than the last-level cache at 1, 2, 3 and 4
rows, and the compiled one is used where it is no slower than oneDNN + 5% (the margin buys
batch invariance). The choice is cached as JSON under ``$EARLYEXIT_HOME/kernels``.
``EARLYEXIT_SKINNY_LINEAR=0`` turns it off; ``=1`` uses it for 1-4 rows without measuring.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from earlyexit.files import atomic_write, home
from earlyexit.models import decode_kernel

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "skinny_linear.c"
MAX_ROWS = 4
MARGIN = 1.05  # the compiled kernel may be this much slower and still be chosen (invariance)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_fn = None
_rows: frozenset[int] | None = None  # row counts that use the kernel (None: not decided)
_state = "not loaded"


def _mode() -> str:
    return os.environ.get("EARLYEXIT_SKINNY_LINEAR", "auto")


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


def _key() -> str:
    ident = (decode_kernel._cpu_identity(), torch.__version__, torch.get_num_threads())
    src = SOURCE.read_bytes()
    return hashlib.sha256(repr(ident).encode() + src).hexdigest()[:16]


def _measure() -> dict:
    """Median seconds per pass over ~96 MB of weights (more than any last-level cache here)
    for oneDNN and the compiled kernel at 1..MAX_ROWS rows."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3072, 576, generator=g) for _ in range(14)]
    out = {}
    for m in range(1, MAX_ROWS + 1):
        x = torch.randn(m, 576, generator=g)
        for name, fn in (
            ("onednn", lambda a, w: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")),
            ("skinny", skinny_linear),
        ):
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                for w in ws:
                    fn(x, w)
                ts.append(time.perf_counter() - t)
            out[f"{name}{m}"] = sorted(ts)[2]
    return out


def chosen_rows() -> frozenset[int]:
    """Row counts (1..MAX_ROWS) whose fp32 CPU linears go through the compiled kernel."""
    global _rows
    if _rows is not None:
        return _rows
    mode = _mode()
    if mode in ("0", "off", "false") or load() is None:
        _rows = frozenset()
        return _rows
    if mode == "1" or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        _rows = frozenset(range(1, MAX_ROWS + 1))
        return _rows
    path = home() / "kernels" / f"linear-choice-{_key()}.json"
    try:
        t = json.loads(path.read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        with torch.inference_mode():
            t = _measure()
        atomic_write(path, json.dumps({"seconds": t}, indent=1) + "\n")
    _rows = frozenset(
        m for m in range(1, MAX_ROWS + 1) if t[f"skinny{m}"] <= MARGIN * t[f"onednn{m}"]
    )
    return _rows


def decided_rows() -> frozenset[int]:
    """The row counts chosen so far, without building or measuring anything (empty until
    :func:`chosen_rows` ran: ``kernels.prepare_decoding``)."""
    return _rows or frozenset()


def status() -> str:
    """Which row counts use the compiled kernel here, or why none do."""
    rows = chosen_rows()
    if rows:
        return (
            f"compiled for {min(rows)}-{max(rows)} rows"
            if len(rows) > 1
            else f"compiled for {min(rows)} row"
        )
    return (
        "off"
        if _mode() in ("0", "off", "false")
        else (_state if _fn is None else "oneDNN measured faster")
    )


def reset() -> None:
    """Forget the choice (tests; a changed EARLYEXIT_SKINNY_LINEAR)."""
    global _rows
    _rows = None
