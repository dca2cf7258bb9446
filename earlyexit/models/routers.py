"""Mixture-of-Recursions routers and their losses (arXiv 2507.10524 §2).

- Expert-choice: one router per recursion r, z_r = router_r(H) (linear d -> 1 without bias,
  or an MLP d -> 2d -> 1 with GELU), init N(0, 0.02); gate g = alpha * sigmoid(z) (or tanh).
  Training keeps the top-k scores among the tokens the previous recursion kept; the
  auxiliary BCE pushes sigmoid(z) to 1 for kept tokens and 0 for the others, which makes
  the causal inference rule sigmoid(z) > 0.5 agree with training.
- Token-choice: one router d -> N_r at the first recursion's input; depth = argmax + 1,
  gate = alpha * softmax at the argmax; balancing loss sum_i f_i P_i and router z-loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit.config import ModelConfig


def _router(d: int, out: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d, out, bias=False)
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, out))


class Routers(nn.Module):
    """The routers of a MoR model: ``n_recursions`` scalar routers, or one over depths."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        r = cfg.router
        self.kind, self.n = r.kind, cfg.sharing.loops
        self.alpha, self.activation = r.gate_scale, r.activation
        if r.kind == "expert":
            self.nets = nn.ModuleList(_router(cfg.d_model, 1, r.router) for _ in range(self.n))
        else:
            self.nets = nn.ModuleList([_router(cfg.d_model, self.n, r.router)])
        # the auxiliary router (expert-choice): decides at inference, learns from detached states
        self.aux = (
            nn.ModuleList(_router(cfg.d_model, 1, "mlp") for _ in range(self.n))
            if r.aux_router and r.kind == "expert"
            else None
        )
        self.bias_step = r.loss_free_bias
        self.register_buffer("bias", torch.zeros(self.n))  # token-choice loss-free balancing

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def scores(self, r: int, h: Tensor) -> Tensor:
        """Expert-choice raw scores z_r (B, T) for hidden states (B, T, d)."""
        return self.nets[r](h).squeeze(-1).float()

    def aux_scores(self, r: int, h: Tensor) -> Tensor:
        """The auxiliary router's scores (B, T) on detached states."""
        return self.aux[r](h.detach()).squeeze(-1).float()

    @torch.no_grad()
    def update_bias(self, choice: Tensor) -> None:
        """Loss-free balancing: push the bias toward under-loaded depths."""
        load = torch.bincount(choice.flatten(), minlength=self.n).float()
        self.bias += self.bias_step * torch.sign(load.mean() - load)

    def gate(self, z: Tensor) -> Tensor:
        """alpha * sigmoid(z) (or tanh): the weight of the recursion's update, in (0, alpha)."""
        return self.alpha * (torch.sigmoid(z) if self.activation == "sigmoid" else torch.tanh(z))

    def depth_logits(self, h: Tensor) -> Tensor:
        """Token-choice logits over depths (B, T, N_r)."""
        return self.nets[0](h).float()


def expert_aux_loss(z: Tensor, selected: Tensor, candidates: Tensor) -> Tensor:
    """BCE-with-logits of scores ``z`` against the top-k ``selected`` mask, averaged over the
    ``candidates`` (all (B, T) bool)."""
    loss = F.binary_cross_entropy_with_logits(z, selected.float(), reduction="none")
    return (loss * candidates).sum() / candidates.sum().clamp_min(1)


def balance_loss(probs: Tensor, choice: Tensor, n: int) -> Tensor:
    """Token-choice balancing: sum_i f_i P_i, f_i = n x share of tokens choosing depth i,
    P_i = mean routing probability of depth i (1 at uniform probabilities, perfect balance)."""
    f = n * F.one_hot(choice, n).float().flatten(0, -2).mean(0)
    p = probs.flatten(0, -2).mean(0)
    return (f * p).sum()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
