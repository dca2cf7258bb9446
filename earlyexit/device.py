"""Device, dtype and training-precision selection.

- ``--device cpu|cuda|cuda:N|auto`` (:func:`resolve_device`);
- ``--dtype auto|float32|bfloat16|float16`` for weights at inference (:func:`resolve_dtype`):
  ``auto`` (the CLI's default) picks bf16 where it is native and float32 elsewhere;
- ``--precision auto|float32|bfloat16`` for training compute (:func:`resolve_precision`):
  ``auto`` picks bf16 autocast only where the hardware runs bf16 matmuls natively. On a CPU
  without AVX512-BF16 or AMX, PyTorch emulates bf16 and a bf16 matmul is tens of times
  slower than fp32 (measured: 0.9 vs 39-49 GFLOP/s on an AVX2-only Zen3), so fp32 wins.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from earlyexit.dtypes import DTYPE_NAMES, PRECISIONS
from earlyexit.errors import DeviceError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware (not emulated).

    CUDA: compute capability with bf16 (Ampere and newer). CPU: the AVX512-BF16 or AMX
    instructions oneDNN uses for bf16 GEMMs; without them a bf16 matmul is emulated.
    ``EARLYEXIT_NATIVE_BF16=0`` or ``1`` overrides the answer for CPUs (so that the suite can
    exercise both precision paths on one machine).
    """
    forced = os.environ.get("EARLYEXIT_NATIVE_BF16")
    if device.type == "cpu" and forced in ("0", "1"):
        return forced == "1"
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: read the CPU flags the kernel reports
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """``(precision, why)`` for training on ``device``: ``auto`` becomes ``bfloat16`` where
    bf16 is native and ``float32`` elsewhere; an explicit choice is kept (the reason says so,
    and warns when bf16 will be emulated)."""
    if name not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    where = "this GPU" if device.type == "cuda" else "this CPU"
    native = native_bf16(device)
    if name == "auto":
        if native:
            return "bfloat16", f"auto: bf16 is native on {where}"
        hw = "no bf16 tensor cores" if device.type == "cuda" else "no AVX512-BF16/AMX"
        return "float32", f"auto: {where} has {hw}, so bf16 would be emulated"
    if name == "bfloat16" and not native:
        return name, (
            f"as asked; warning: bf16 is emulated on {where} and will run far slower than "
            f"float32 (--precision auto picks float32 here)"
        )
    return name, "as asked"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a one-line error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "CUDA was requested but no CUDA device is available here; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported; use cpu, cuda or auto")
    return dev


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """Map a dtype name to torch; refuse a dtype the device cannot run. ``None`` keeps the
    stored dtype; ``auto`` is bfloat16 where :func:`native_bf16` (halving the weight bytes a
    decode step streams, with bf16 arithmetic in hardware) and float32 elsewhere (emulated
    bf16 runs tens of times slower than float32; float16 has no fast CPU path)."""
    if name is None or isinstance(name, torch.dtype):
        dtype = name
    elif name == "auto":
        dtype = torch.bfloat16 if native_bf16(torch.device(device)) else torch.float32
    else:
        if name not in DTYPES:
            raise DeviceError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
        dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("bfloat16 is not supported by this CUDA device; use float16 or float32")
    return dtype
