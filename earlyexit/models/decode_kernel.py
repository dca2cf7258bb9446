"""A compiled CPU kernel for decode attention: every row attends over its own KV block.

Why it exists. Depth-wise batching runs one shared block on rows at different loops of it,
and each row reads its own KV slot. PyTorch's attention takes one key tensor for the whole
batch, so rows at different slots either gather a copy of their histories into one batch,
attend once per slot over every row, or attend row by row (one launch each): all measured
10-30% over a plain call at the SmolLM shape (BENCHMARKS.md, ``depthwise --calls``). The
remedy is paged attention's: one kernel that reads each row's keys and values through a
per-row offset (a "page table" with one page per (slot, row)) and writes the row's new
entry in the same pass. No CPU kernel of that kind ships with PyTorch (FlexAttention on
CPU needs inductor, took 37 s to compile a shape and failed on dynamic ones), so this is a
small C file (``csrc/decode_attention.c``), compiled once per machine with the system's C
compiler and loaded through ctypes.

Scope: CPU, fp32, up to ``MAX_CHUNK`` new tokens per row (decode steps, catch-up and
verification chunks), no sliding window; everything else (prefill, bf16, CUDA, autograd)
keeps ``F.scaled_dot_product_attention``. It also
serves the plain decode step (every row at one slot): grouped-query heads share one read
of K and V, which makes it faster than SDPA's CPU kernel for decode (measured 1.5-1.9x on
the attention alone), and it keeps the plain and the depth-wise call on the same kernel,
so each row's output does not depend on which other rows share its call.

The build lands in ``$EARLYEXIT_HOME/kernels`` (default ``~/.cache/earlyexit/kernels``),
named by a hash of the source, flags, compiler and CPU flags, written atomically. ``load()``
builds it (once per machine), loads it (once per process) and returns a :class:`Kernel`;
``KVCache.for_model`` calls it when it allocates a CPU fp32 cache, and the cache carries the
kernel. Nothing builds inside a forward: a forward whose cache has no kernel attends through
PyTorch (``models/attention.py`` chooses, once per forward context). If there is no compiler
or the build fails, the reason is logged once and the PyTorch paths are used.
``EARLYEXIT_DECODE_KERNEL=0`` turns the kernel off (the ablation; a cache's
``attention = "sdpa"`` does so for that cache).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from earlyexit.files import atomic_file, home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
# -march=native: the build runs on the machine that uses it (and is cached per machine by
# the compiler's identity); -ffast-math lets the dot products and exp vectorise (results
# agree with SDPA to ~1e-6, tested), and is given to the compile step only: linking with it
# adds crtfastmath, which turns on flush-to-zero for the whole process when the library
# loads (caught by a test: subnormal floats vanished everywhere). OpenMP shares the libgomp
# PyTorch has already loaded.
COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
LINK_FLAGS = ("-shared", "-fopenmp")

_P, _I = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [
    _P, _I, _I, _I,  # q, its row, head and query strides
    _P, _P, _I, _I, _I, _I, _I,  # k_new, v_new, their row strides, head stride, query strides
    _P, _P, _I,  # k cache, v cache, head stride within a block
    _P, _P, _P,  # offsets, entries before the call, new entries (per row)
    _I, _I, _I, _I, _I, ctypes.c_float,  # R, T, Hkv, G, D, scale
    _P, ctypes.c_int,  # out, threads
]  # fmt: skip


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's flags (a home directory shared by machines
    with different CPUs must not load a library built for another's instructions)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cc: str, source: Path = SOURCE) -> Path:
    """Compile ``source`` (once per source, flags, compiler and CPU) and return the library
    (``skinny.py`` builds its kernel through this too)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        source.read_bytes()
        + repr((COMPILE_FLAGS, LINK_FLAGS, version, platform.machine(), _cpu_identity())).encode()
    ).hexdigest()[:16]
    lib = home() / "kernels" / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    # atomic: a concurrent build or a kill leaves no half library
    with atomic_file(lib, suffix=".so") as tmp:
        obj = tmp.with_suffix(".o")
        try:
            for cmd in (
                [cc, *COMPILE_FLAGS, "-c", str(source), "-o", str(obj)],
                [cc, *LINK_FLAGS, str(obj), "-o", str(tmp), "-lm"],
            ):
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if res.returncode != 0:
                    raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        finally:
            obj.unlink(missing_ok=True)
    return lib


def enabled() -> bool:
    """Whether the kernel may be used at all (``EARLYEXIT_DECODE_KERNEL=0`` turns it off)."""
    return os.environ.get("EARLYEXIT_DECODE_KERNEL", "1") not in ("0", "false", "off")


def load() -> Kernel | None:
    """The kernel, built on the first call on this machine and loaded once per process;
    None when turned off or unavailable (``status`` says why). An explicit call, made when a
    CPU fp32 cache is allocated (``KVCache.for_model``), never inside a forward."""
    if not enabled():
        return None
    got = _load()
    return got if isinstance(got, Kernel) else None


@functools.cache
def _load() -> Kernel | str:
    """The loaded kernel, or why there is none (a failed build is not retried in this
    process)."""
    cc = _compiler()
    try:
        if cc is None:
            raise RuntimeError("no C compiler found (set CC)")
        path = _build(cc)
        fn = ctypes.CDLL(str(path)).ee_decode_attention
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("decode attention kernel unavailable, using PyTorch attention: %s", e)
        return f"unavailable: {e}"
    fn.restype, fn.argtypes = ctypes.c_int, _ARGTYPES
    return Kernel(fn, path)


def status() -> str:
    """What the kernel is in this process: compiled (and where), unavailable (why), disabled.
    Loads it (reports ask this before or after decoding, never inside a forward)."""
    if not enabled():
        return "disabled"
    got = _load()
    return f"compiled: {got.path}" if isinstance(got, Kernel) else got


# Chunks of up to this many new tokens per row go through the kernel (a decode step, FREE's
# catch-ups, speculative verification); each of a chunk's queries reads the row's whole
# history, so prefill stays on SDPA's blocked kernel.
MAX_CHUNK = 4


def block_offsets(cache: Tensor, blocks: np.ndarray) -> np.ndarray:
    """Where each (slot, row) block starts in a cache buffer (..., Hkv, S, D), in elements:
    ``blocks`` index the buffer's leading dimensions flattened (slot x batch + row). The one
    place the buffer's memory layout is read."""
    Hkv, S, D = cache.shape[-3:]
    return blocks * (Hkv * S * D)


class Kernel:
    """The loaded library (``load``). Attention backends call :meth:`append_attend`."""

    def __init__(self, fn, path: Path) -> None:
        self._fn, self.path = fn, path

    def __deepcopy__(self, memo) -> Kernel:
        return self  # one library per process: a copied cache shares it

    def __reduce__(self):
        return (load, ())  # unpickled where the library is loaded (or None there)

    def append_attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        blocks: np.ndarray,
        starts: np.ndarray,
        n_new: np.ndarray,
    ) -> Tensor:
        """Append each row's ``k``, ``v`` (B, Hkv, T, D) to its block and attend over it.

        Args:
            q: queries (B, H, T, D), H a multiple of Hkv; the last dim contiguous.
            k_cache, v_cache: the cache's buffers (n_slots, batch, Hkv, S, D), contiguous.
            blocks: (B,) each row's (slot, row) block, as ``slot * batch + row``;
                starts: (B,) entries before the append; n_new: (B,) valid new tokens (the
                rest of T is right padding, never written). All checked by the cache's plan.
        Returns:
            attention output (B, H, T, D); query t of row b sees the block's first
            ``starts[b] + t + 1`` entries; padding queries are zeros.
        """
        B, H, T, D = q.shape
        Hkv, S = k_cache.shape[-3], k_cache.shape[-2]
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(-1) != 1:
                raise ValueError(f"decode kernel: {name}'s last dimension must be contiguous")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode kernel: the cache buffers must be contiguous")
        if k.stride(1) != v.stride(1):
            raise ValueError("decode kernel: k and v must share their head stride")
        offsets = np.ascontiguousarray(block_offsets(k_cache, blocks), dtype=np.int64)
        starts = np.ascontiguousarray(starts, dtype=np.int64)
        n_new = np.ascontiguousarray(n_new, dtype=np.int64)
        out = torch.empty(B, H, T, D, dtype=q.dtype)
        rc = self._fn(
            q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
            k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), k.stride(1), k.stride(2),
            v.stride(2),
            k_cache.data_ptr(), v_cache.data_ptr(), S * D,
            offsets.ctypes.data, starts.ctypes.data, n_new.ctypes.data,
            B, T, Hkv, H // Hkv, D, D**-0.5,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("decode kernel: could not allocate its score buffer")
        return out
