"""Per-step LoRA on shared blocks: the relaxation of Relaxed Recursive Transformers (§2).

- A shared block run by several steps holds one LoRA *slot* per step (the step's
  recursion): for each target linear (q, k, v, o, gate, up, down) with rank r > 0,
  A (slots, r, d_in) and B (slots, d_out, r). The step's output adds B_l A_l x with scale
  exactly 1 (the paper has no alpha / r factor).
- ``delta(target, x, slot)``: one slot for the whole batch (a plain step), or a (B,) tensor
  of per-row slots: rows at different depths of the same block in one call, each with its
  own LoRA. Rows are grouped by slot (a call holds at most as many groups as the block has
  recursions, 2-3) and each group runs the plain two GEMMs on its rows. Gathering each
  row's own A and B instead (batched matmuls, the first design) copied the LoRA weights
  once per row: at SmolLM2's shape with rank 64, ~20 MB per row per block call, which made
  depth-wise batching of the converted model 0.65x of continuous batching with no exits
  (0.86x grouped). Stacking the present slots' A and B so that every call runs two GEMMs
  whatever the mix (the other slots' part zeroed per row) measured no faster than grouping,
  so it was not kept (nor was fusing the targets' calls: BENCHMARKS.md, "real model").
  The serving engine's depth-wise batching relies on this.
- ``svd_init``: B = U_r S_r, A = V_r^T from the truncated SVD (fp32) of the residual
  W_l - W' between the step's original and the shared weight; standard init (Gaussian A,
  B = 0) where the residual is zero. Full rank reproduces W_l exactly (Eckart-Young).
- ``whitened_svd`` (``asvd`` init): the truncated SVD of the residual *as it acts on the
  step's inputs*: with C = E[x x^T] of the source layer's inputs to that linear (measured
  on calibration tokens) and C = L L^T, B A = [R L]_r L^{-1} minimises E||(R - B A) x||^2 over
  rank-r B A (SVD-LLM's truncation-aware whitening), where plain SVD minimises ||R - B A||_F
  and spends rank on directions the inputs never take. Full rank is still exact.
- ``drift_corrected``: for a sequential fit (``lora_init="sequential"``), the residual that
  makes the step map the converted model's own inputs x_r to what the source layer makes
  of *its* inputs x_d: R + W_src (E[x_d x_r^T] - E[x_r x_r^T]) E[x_r x_r^T]^{-1}, which
  ``whitened_svd`` then truncates over x_r. Equal inputs leave R (full rank stays exact).
- ``merged``: W' + B_l A_l, for export or analysis.
- Optional per-step offsets of the block's two norm weights (``norms``) and of its biases
  (``biases``): the step's norm weight is shared + offset, its bias shared + offset. Tied
  norms and biases are otherwise what keeps a full-rank relaxation from reproducing a
  source whose layers differ in them (Qwen2's q/k/v biases, per-layer norms).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from earlyexit.config import LORA_TARGETS, ModelConfig


class LoraBank(nn.Module):
    """The LoRA slots of one shared block."""

    def __init__(self, cfg: ModelConfig, n_slots: int) -> None:
        super().__init__()
        self.n_slots = n_slots
        self.shapes = {t: cfg.lora_shape(t) for t in LORA_TARGETS if cfg.lora_shape(t)[0] > 0}
        self.A = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(n_slots, r, i)) for t, (r, i, o) in self.shapes.items()}
        )
        self.B = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(n_slots, o, r)) for t, (r, i, o) in self.shapes.items()}
        )
        self._grouped: tuple[Tensor, list] | None = None  # see _groups
        d = cfg.d_model
        # per-step offsets: norm weights ("attn", "mlp") and biases (by fused linear)
        self.norm = (
            nn.ParameterDict({k: nn.Parameter(torch.zeros(n_slots, d)) for k in ("attn", "mlp")})
            if cfg.lora.norms
            else None
        )
        self.bias = (
            nn.ParameterDict(
                {k: nn.Parameter(torch.zeros(n_slots, w)) for k, w in cfg.lora_bias_dims().items()}
            )
            if cfg.lora.biases
            else None
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Standard LoRA init: Gaussian A (std 1/r), B = 0, so every delta starts at zero;
        zero norm and bias offsets."""
        for t, (r, _, _) in self.shapes.items():
            nn.init.normal_(self.A[t], 0.0, 1.0 / r, generator=generator)
            nn.init.zeros_(self.B[t])
        for offsets in (self.norm, self.bias):
            for p in (offsets or {}).values():
                nn.init.zeros_(p)

    @staticmethod
    def _pick(offsets: Tensor, slot: int | Tensor) -> Tensor:
        """One slot's offset (n,), or per-row slots' (B, 1, n) to broadcast over (B, T, n)."""
        return offsets[slot] if isinstance(slot, int) else offsets[slot][:, None, :]

    def norm_offset(self, which: str, slot: int | Tensor) -> Tensor | None:
        """Offset of the ``attn`` or ``mlp`` norm weight for ``slot``, or None."""
        return None if self.norm is None else self._pick(self.norm[which], slot)

    def bias_offset(self, name: str, slot: int | Tensor) -> Tensor | None:
        """Offset of the bias of fused linear ``name`` (qkv, o, w13, w2), or None."""
        if self.bias is None or name not in self.bias:
            return None
        return self._pick(self.bias[name], slot)

    def delta(self, target: str, x: Tensor, slot: int | Tensor) -> Tensor | None:
        """B A x for ``x`` (B, T, d_in): one slot for all rows, or per-row slots (B,)."""
        if target not in self.A:
            return None
        A, Bm = self.A[target], self.B[target]
        # plain matmuls (MKL): for these skinny weights oneDNN's linear, which kernels.py
        # uses for the base weights, measured 15-20% slower end to end (SmolLM2 rank 64)
        if isinstance(slot, int):
            return (x @ A[slot].transpose(0, 1)) @ Bm[slot].transpose(0, 1)  # (B, T, d_out)
        groups = self._groups(slot)
        if len(groups) == 1:
            return self.delta(target, x, groups[0][0])
        out = x.new_empty(*x.shape[:-1], Bm.shape[1])  # (B, T, d_out)
        for s, rows in groups:  # every row is in exactly one group
            out[rows] = (x[rows] @ A[s].transpose(0, 1)) @ Bm[s].transpose(0, 1)
        return out

    def _groups(self, slot: Tensor) -> list[tuple[int, Tensor]]:
        """[(slot, the rows holding it)] for per-row slots (B,), by slot. A block call asks
        for every target with the same tensor, so the grouping (one host read) is kept."""
        if self._grouped is not None and self._grouped[0] is slot:
            return self._grouped[1]
        ids = slot.tolist()
        groups = [
            (s, torch.tensor([i for i, v in enumerate(ids) if v == s], device=slot.device))
            for s in sorted(set(ids))
        ]
        self._grouped = (slot, groups)
        return groups

    def merged_delta(self, target: str, slot: int) -> Tensor | None:
        """B_slot A_slot (d_out, d_in), or None when the target has no LoRA."""
        if target not in self.A:
            return None
        return self.B[target][slot] @ self.A[target][slot]


def truncated_svd(residual: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(B, A) with B A the best rank-``rank`` approximation of ``residual`` (d_out, d_in),
    computed in fp32: B = U_r S_r, A = V_r^T."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


# Ridge on calibration moments, relative to their mean diagonal: keeps the Cholesky factor
# invertible and L^{-1} bounded where the inputs have ~no variance (the tests set it to 0
# to compare against exact least squares).
CALIBRATION_DAMP = 1e-2


def _damped(cov: Tensor, damp: float | None) -> Tensor:
    """``cov`` in float64 plus ``damp`` (``CALIBRATION_DAMP`` when None) x its mean diagonal x I."""
    damp = CALIBRATION_DAMP if damp is None else damp
    c = cov.double()
    return c + damp * c.diagonal().mean().clamp_min(1e-12) * torch.eye(len(c), dtype=c.dtype)


def whitened_svd(
    residual: Tensor, cov: Tensor, rank: int, damp: float | None = None
) -> tuple[Tensor, Tensor]:
    """(B, A), fp32, with B A the rank-``rank`` matrix closest to ``residual`` (d_out, d_in)
    in output error over inputs of second moment ``cov`` (d_in, d_in): it minimises
    trace((R - B A) C' (R - B A)^T), C' = cov + damp * mean(diag(cov)) * I (``damp``:
    ``CALIBRATION_DAMP`` when None).
    Computed in float64: L is the Cholesky factor of C', B = U_r S_r and A = V_r^T L^{-1}
    from the SVD U S V^T of R L."""
    chol = torch.linalg.cholesky(_damped(cov, damp))  # C' = L L^T
    u, s, vh = torch.linalg.svd(residual.double() @ chol, full_matrices=False)
    # A = V_r^T L^{-1}  <=>  L^T A^T = V_r
    a = torch.linalg.solve_triangular(chol.mT, vh[:rank].mT, upper=True).mT
    return (u[:, :rank] * s[:rank]).float(), a.float()


def drift_corrected(
    residual: Tensor, w_src: Tensor, c_rr: Tensor, c_dr: Tensor, damp: float | None = None
) -> Tensor:
    """The unconstrained least-squares delta M (d_out, d_in), float64, minimising
    E||W_src x_d - (W_shared + M) x_r||^2 given ``residual`` = W_src - W_shared, the
    converted model's input moment ``c_rr`` = E[x_r x_r^T] and the cross moment ``c_dr`` =
    E[x_d x_r^T] (source inputs x_d at the same positions): M = R + W_src (C_dr - C_rr) C_rr^-1.
    Only the drift term is damped (C_rr + damp * mean(diag) * I), so equal inputs give R."""
    c = _damped(c_rr, damp)
    drift = torch.linalg.solve(c, (c_dr.double() - c_rr.double()).mT).mT  # (C_dr - C_rr) C^-1
    return residual.double() + w_src.double() @ drift
