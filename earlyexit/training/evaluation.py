"""Validation during training: the mean token NLL over the first ``eval_batches`` windows
of the validation split (the same windows at every evaluation)."""

from __future__ import annotations

from earlyexit.training.config import TrainConfig
from earlyexit.training.data import Windows, val_batches
from earlyexit.training.distributed import Dist
from earlyexit.training.losses import evaluate_nll


def validation_nll(model, val_w: Windows, cfg: TrainConfig, device, d: Dist) -> float:
    """Validation NLL on every rank's copy (identical data; FSDP needs all ranks anyway)."""
    model.eval()
    try:
        nll, _ = evaluate_nll(model, val_batches(val_w, cfg.batch_size, cfg.eval_batches))
    finally:
        model.train()
    return nll
