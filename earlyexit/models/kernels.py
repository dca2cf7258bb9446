"""The linear layers' kernel: chosen per dtype and row count by measurement, ``F.linear``
for everything else.

- CPU inference (no autograd, fp32 or bf16) goes through the kernel ``linear_choice.py``
  measured fastest on this machine for that many rows: oneDNN
  (``torch.ops.mkldnn._linear_pointwise``), MKL (``F.linear``) or, for 1-4 fp32 rows, the
  compiled batch-invariant kernel of ``skinny.py``. Decoding is weight-streaming bound, so
  this one choice is most of a decode step's speed, and it differs between CPUs.
- Until a choice is made (``prepare_decoding``, called when a decode cache is created; never
  inside a forward) CPU inference uses oneDNN where PyTorch has it.
- Anything needing gradients, other devices and other dtypes use ``F.linear``.
All candidates agree with ``F.linear`` to float rounding (different summation order).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit.models import linear_choice, skinny

_ROWS = 65  # tables hold rows 0..64; more rows use the last entry
_TABLES: dict[torch.dtype, list] = {}  # dtype -> kernel function per row count
_CHOICES: dict[torch.dtype, linear_choice.Choice] = {}


def _skinny_or_onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if w.is_contiguous() and (b is None or b.is_contiguous()):
        return skinny.skinny_linear(x, w, b)
    return _onednn(x, w, b)


def _onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    try:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except RuntimeError:  # an unusual build or CPU: MKL from now on
        for table in _TABLES.values():
            table[:] = [F.linear if f is _onednn else f for f in table]
        return F.linear(x, w, b)


_FUNCTIONS = {"skinny": _skinny_or_onednn, "onednn": _onednn, "mkl": F.linear}


def _install(choice: linear_choice.Choice) -> None:
    if "skinny" in choice.kernels and skinny.load() is None:  # a cached choice, no compiler now
        fallback = "onednn" if linear_choice.onednn_available() else "mkl"
        kernels = tuple(fallback if k == "skinny" else k for k in choice.kernels)
        choice = linear_choice.Choice(
            choice.dtype, kernels, choice.how + ", compiled kernel unavailable"
        )
    _CHOICES[choice.dtype] = choice
    _TABLES[choice.dtype] = [F.linear] + [
        _FUNCTIONS[choice.for_rows(r)] for r in range(1, _ROWS)
    ]  # row 0: F.linear handles empty inputs


def _default_tables() -> None:
    _TABLES.clear()
    _CHOICES.clear()
    if linear_choice.onednn_available():
        for dt in (torch.float32, torch.bfloat16):
            _TABLES[dt] = [F.linear] + [_onednn] * (_ROWS - 1)


_default_tables()


def reset() -> None:
    """Forget every choice (tests; a changed ``EARLYEXIT_LINEAR``)."""
    _default_tables()


def choice(dtype: torch.dtype) -> linear_choice.Choice | None:
    """The choice in force for CPU linears in ``dtype`` (None: not made yet)."""
    return _CHOICES.get(dtype)


def status() -> str:
    """One line per dtype chosen so far, e.g. ``float32: 1-4 rows skinny, 5+ rows onednn
    (measured)``; ``oneDNN (no choice made yet)`` before any."""
    if not _CHOICES:
        return "oneDNN (no choice made yet)" if _TABLES else "F.linear"
    return "; ".join(c.summary() for c in _CHOICES.values())


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """``(out, in)`` of every linear weight ``model`` runs per token, the LM head included."""
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    head = getattr(model, "head_weight", None)
    if callable(head):
        shapes.add(tuple(head().shape))
    return sorted(shapes)


def prepare_decoding(device: torch.device, dtype: torch.dtype, shapes=None) -> None:
    """Choose the CPU linear kernel per row count for ``dtype`` now, from weights of
    ``shapes`` (a machine's first call measures, ~1-3 s; later ones read the cached choice).
    ``KVCache.for_model`` calls it, so every cached decode has it ready; a forward never
    compiles or times anything. The first model prepared in a process decides for its dtype."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return
    if dtype in _CHOICES:
        return
    _install(linear_choice.choose(dtype, shapes or [(3072, 576), (576, 1536)]))


@contextlib.contextmanager
def forced(name: str | None):
    """Run CPU inference linears through kernel ``name`` (``onednn``, ``mkl``, ``skinny``
    where it applies) inside the block: benchmarks' ablations. ``None``: no change."""
    if name is None:
        yield
        return
    saved_tables = {k: list(v) for k, v in _TABLES.items()}
    saved_choices = dict(_CHOICES)
    for dt in (torch.float32, torch.bfloat16):
        _install(linear_choice.fixed(dt, name))
    try:
        yield
    finally:
        _TABLES.clear()
        _TABLES.update(saved_tables)
        _CHOICES.clear()
        _CHOICES.update(saved_choices)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` through the kernel chosen for this dtype and row count (CPU
    inference), ``F.linear`` otherwise."""
    table = _TABLES.get(x.dtype)
    if (
        table is not None
        and x.device.type == "cpu"
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()  # inductor lowers CPU linears itself
    ):
        rows = x.numel() // max(1, x.shape[-1])
        return table[rows if rows < _ROWS else -1](x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
