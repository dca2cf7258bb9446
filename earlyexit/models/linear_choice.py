"""Which kernel computes a CPU inference linear, chosen by measurement on the machine that
runs it.

Decoding is a few rows times every weight of the model, so the linear kernel decides most of
a decode step's time, and the best one is not the same on every CPU (measured: oneDNN's
fp32 GEMV streamed weights 1.77x faster than MKL's ``F.linear`` on an AVX2 Zen 3 VM and
was ~20% slower than it on an AMX Sapphire Rapids VM; BENCHMARKS.md, ``decode``). The
candidates:

- ``onednn``: ``torch.ops.mkldnn._linear_pointwise`` (what ``torch.compile`` uses for frozen
  CPU linears);
- ``mkl``: ``F.linear`` (PyTorch's default CPU GEMM);
- ``skinny``: the compiled few-row kernel (``skinny.py``), fp32 and at most 4 rows; a row's
  result never depends on the rows beside it (batch invariance), so it is chosen while it
  is no more than 5% slower than the fastest.

:func:`choose` times every candidate at 1, 2, 3, 4, 8, 16 and 64 rows over weights of the
model's own shapes, repeated past any last-level cache, checks each against float64 (a
candidate outside the dtype's tolerance is never chosen) and keeps the fastest per row
count. The result is cached as JSON under ``$EARLYEXIT_HOME/kernels``, keyed by the CPU's
flags, torch version, thread count, dtype and shapes; a file whose recorded identity differs
(copied from another machine) is measured again. ``kernels.prepare_decoding`` makes the
choice when a decode cache is created; a forward never measures anything.

``EARLYEXIT_LINEAR``: ``auto`` (measure; the default), ``fixed`` (no measurement: the
compiled kernel for 1-4 fp32 rows where it builds, oneDNN elsewhere: what the test suite
runs, identical on every machine), or one candidate's name (that kernel wherever it
applies: ablations). ``EARLYEXIT_SKINNY_LINEAR=0`` removes the compiled kernel from the
candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from earlyexit.files import atomic_write, home
from earlyexit.models import decode_kernel, skinny

CANDIDATES = ("skinny", "onednn", "mkl")
BUCKETS = (1, 2, 3, 4, 8, 16, 64)  # row counts measured; r rows use the first bucket >= r
SKINNY_MARGIN = 1.05  # the batch-invariant kernel may be this much slower and still win
MIN_BYTES = 96 * 2**20  # weights timed per pass: past any last-level cache seen here
REPEATS = 5
# agreement with float64 a candidate must show (max abs error / max abs value of the result)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
VERSION = 1  # bump when the measurement changes meaning


def mode() -> str:
    """``EARLYEXIT_LINEAR`` (``auto``, ``fixed`` or a candidate's name)."""
    m = os.environ.get("EARLYEXIT_LINEAR", "auto")
    if m not in ("auto", "fixed", *CANDIDATES):
        raise ValueError(
            f"EARLYEXIT_LINEAR must be auto, fixed or one of {', '.join(CANDIDATES)}; got {m!r}"
        )
    return m


def skinny_allowed() -> bool:
    return os.environ.get("EARLYEXIT_SKINNY_LINEAR", "auto") not in ("0", "off", "false")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x, w, b):
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _candidates(dtype: torch.dtype, rows: int) -> list[str]:
    """The kernels that can compute ``rows`` rows in ``dtype`` here."""
    out = []
    few = dtype == torch.float32 and rows <= skinny.MAX_ROWS and skinny_allowed()
    if few and skinny.load() is not None:
        out.append("skinny")
    if onednn_available():
        out.append("onednn")
    out.append("mkl")
    return out


@dataclass(frozen=True)
class Choice:
    """The kernel per measured row count (``BUCKETS``) for one dtype, and why."""

    dtype: torch.dtype
    kernels: tuple[str, ...]  # one per bucket
    how: str  # "measured", "cached", "fixed", "forced"
    seconds: dict = field(default_factory=dict)  # {bucket: {candidate: median s per pass}}
    excluded: dict = field(default_factory=dict)  # {candidate: why it was not exact}

    def for_rows(self, rows: int) -> str:
        for b, k in zip(BUCKETS, self.kernels):
            if rows <= b:
                return k
        return self.kernels[-1]

    def summary(self) -> str:
        """e.g. ``1-4 rows skinny, 8-16 onednn, 17+ mkl (measured)``."""
        parts, lo = [], 1
        for i, (b, k) in enumerate(zip(BUCKETS, self.kernels)):
            last = i == len(BUCKETS) - 1
            if not last and self.kernels[i + 1] == k:
                continue
            span = f"{lo}+" if last else (f"{lo}" if lo == b else f"{lo}-{b}")
            parts.append(f"{span} rows {k}")
            lo = b + 1
        name = str(self.dtype).removeprefix("torch.")
        return f"{name}: " + ", ".join(parts) + f" ({self.how})"


def fixed(dtype: torch.dtype, forced: str | None = None) -> Choice:
    """The choice without measuring: ``forced`` wherever it applies (else the fixed rule:
    the compiled kernel for few fp32 rows, oneDNN, then MKL)."""
    kernels = []
    for b in BUCKETS:
        cands = _candidates(dtype, b)
        kernels.append(forced if forced in cands else cands[0])
    return Choice(dtype, tuple(kernels), "forced" if forced else "fixed")


def _identity(dtype: torch.dtype, shapes: tuple[tuple[int, int], ...]) -> dict:
    return {
        "version": VERSION,
        "cpu": decode_kernel._cpu_identity().strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "shapes": [list(s) for s in shapes],
        "skinny": hashlib.sha256(skinny.SOURCE.read_bytes()).hexdigest()[:16],
    }


def _cache_path(ident: dict):
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return home() / "kernels" / f"linear-choice-{key}.json"


def _weights(dtype, shapes, generator) -> list[torch.Tensor]:
    """Weights of ``shapes`` in turn, at least ``MIN_BYTES`` of them."""
    ws, size, i = [], 0, 0
    elem = torch.empty((), dtype=dtype).element_size()
    while size < MIN_BYTES or i < len(shapes):
        n, k = shapes[i % len(shapes)]
        ws.append(torch.randn(n, k, generator=generator).to(dtype))
        size += n * k * elem
        i += 1
    return ws


FUNCTIONS = {"skinny": lambda x, w, b: skinny.skinny_linear(x, w, b), "onednn": _onednn,
             "mkl": F.linear}  # fmt: skip


def measure(dtype: torch.dtype, shapes) -> tuple[dict, dict]:
    """``({bucket: {candidate: median seconds per pass}}, {candidate: why excluded})``:
    every candidate over the same weights (``MIN_BYTES`` of the given ``(out, in)`` shapes),
    in rotating order, ``REPEATS`` times; a candidate whose result strays from float64 by
    more than the dtype's tolerance is excluded."""
    g = torch.Generator().manual_seed(0)
    ws = _weights(dtype, list(shapes), g)
    tol = TOLERANCE.get(dtype, 2e-2)
    seconds, excluded = {}, {}
    with torch.inference_mode():
        for b in BUCKETS:
            xs = {k: torch.randn(b, k, generator=g).to(dtype) for k in {w.shape[1] for w in ws}}
            cands = [c for c in _candidates(dtype, b) if c not in excluded]
            w0 = ws[0]
            ref = xs[w0.shape[1]].double() @ w0.double().T
            for c in list(cands):
                try:
                    y = FUNCTIONS[c](xs[w0.shape[1]], w0, None).double()
                    err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                except RuntimeError as e:
                    err, why = float("inf"), f"failed: {e}"
                else:
                    why = f"error {err:.1e} of the result's scale (tolerance {tol:g})"
                if not err <= tol:
                    excluded[c] = f"{b} rows: {why}"
                    cands.remove(c)
            times: dict[str, list[float]] = {c: [] for c in cands}
            for r in range(REPEATS):
                for c in cands[r % len(cands) :] + cands[: r % len(cands)]:
                    fn = FUNCTIONS[c]
                    t = time.perf_counter()
                    for w in ws:
                        fn(xs[w.shape[1]], w, None)
                    times[c].append(time.perf_counter() - t)
            seconds[str(b)] = {c: statistics.median(v) for c, v in times.items()}
    return seconds, excluded


def _pick(seconds: dict) -> tuple[str, ...]:
    kernels = []
    for b in BUCKETS:
        t = seconds[str(b)]
        best = min(t, key=t.get)
        if "skinny" in t and t["skinny"] <= SKINNY_MARGIN * t[best]:
            best = "skinny"
        kernels.append(best)
    return tuple(kernels)


def choose(dtype: torch.dtype, shapes) -> Choice:
    """The kernel per row count for CPU linears in ``dtype`` over weights of ``shapes``
    (``(out_features, in_features)`` pairs): measured once per machine (~1-3 s, said on
    stderr), then read from the cache."""
    m = mode()
    if m == "fixed":
        return fixed(dtype)
    if m in CANDIDATES:
        return fixed(dtype, m)
    shapes = tuple(sorted({(int(n), int(k)) for n, k in shapes}))
    ident = _identity(dtype, shapes)
    path = _cache_path(ident)
    try:
        data = json.loads(path.read_text())
        if data["identity"] != ident:  # copied from another machine or torch
            raise KeyError("identity")
        return Choice(
            dtype, tuple(data["kernels"]), "cached", data["seconds"], data.get("excluded", {})
        )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    name = str(dtype).removeprefix("torch.")
    print(
        f"earlyexit: timing the CPU linear kernels for {name} on this machine "
        "(once; cached under the earlyexit home)",
        file=sys.stderr,
    )
    seconds, excluded = measure(dtype, shapes)
    kernels = _pick(seconds)
    record = {"identity": ident, "kernels": list(kernels), "seconds": seconds,
              "excluded": excluded}  # fmt: skip
    atomic_write(path, json.dumps(record, indent=1) + "\n")
    return Choice(dtype, kernels, "measured", seconds, excluded)
