"""Device and dtype selection: ``--device cpu|cuda|auto`` and ``--dtype float32|bfloat16|float16``."""

from __future__ import annotations

import torch

from earlyexit.errors import DeviceError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """Map a dtype name to torch; refuse a dtype the device cannot run."""
    if name is None or isinstance(name, torch.dtype):
        dtype = name
    else:
        if name not in DTYPES:
            raise DeviceError(f"unknown dtype {name!r}; use {', '.join(DTYPES)}")
        dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("bfloat16 is not supported by this CUDA device; use float16 or float32")
    return dtype
