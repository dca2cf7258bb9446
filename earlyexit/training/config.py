"""What a training run depends on: :class:`TrainConfig`, every field a flag of ``earlyexit
train`` and a key of a recipe file (``earlyexit/recipes/*.json``) or ``--config`` file."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from earlyexit.datafiles import split_description
from earlyexit.dtypes import PRECISIONS
from earlyexit.errors import ConfigError
from earlyexit.strict import parse_dataclass
from earlyexit.training.schedule import SCHEDULES

# torch-free (as this module is), so that ``earlyexit train``'s flags can offer them at parse
# time; ``training/exit_losses.py`` implements them
EXIT_LOSSES = ("weighted", "aggressive", "shallow-deep")
NONFINITE = ("stop", "skip")  # what a NaN/inf loss does


def _choice(default: str, choices: tuple[str, ...]):
    """A field whose value is one of ``choices``: :meth:`TrainConfig.validate` refuses any
    other, and so does its ``earlyexit train`` flag (both through :func:`check_choice`)."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``-1`` / ``0`` disable where noted.

    Attributes:
        data: prepared data directory (``earlyexit prepare``).
        out: run directory (checkpoints, metrics, final model).
        model: model preset name or path to a ModelConfig JSON (training from scratch).
        init_from: checkpoint to start from instead (fine-tuning); overrides ``model``.
        objective: training objective: ``lm``, ``exits``, ``exit-classifier`` or ``uptrain``.
        seq_len: tokens per training window.
        batch_size: windows per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        steps: optimizer steps in the run (the schedule spans them).
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        schedule: ``cosine`` or ``wsd`` (warmup-stable-decay).
        warmup_steps: linear warmup steps.
        decay_fraction: ``wsd`` only: fraction of steps spent decaying.
        weight_decay: AdamW weight decay on matrices (not norms, biases, embeddings).
        beta1, beta2: AdamW betas.
        grad_clip: max global gradient norm (<= 0 disables).
        precision: ``auto`` (bf16 autocast where the device runs bf16 natively, fp32
            elsewhere: :func:`earlyexit.device.resolve_precision`), ``float32``, or
            ``bfloat16`` autocast with fp32 master weights.
        eval_every: steps between validation evaluations (<= 0: only at the end).
        eval_batches: validation batches per evaluation.
        save_every: steps between checkpoints (<= 0: only at the end).
        keep_last: checkpoints kept (<= 0 keeps all).
        log_every: steps between metric lines.
        seed: seed of initialisation and data order.
        nonfinite: ``stop`` or ``skip`` on a NaN/inf loss.
        device: ``cpu``, ``cuda`` or ``auto``.
        threads: torch CPU threads (0: leave torch's default).
        fsdp: shard with FSDP2 instead of replicating with DDP (multi-process runs).
        stop_at_step: end the process after this step as if interrupted (-1: never); for
            resume tests and time-sliced jobs.
        exit_steps: set the model's early-exit points (None: keep the model's).
        exit_loss: ``--objective exits``: ``weighted`` (CALM), ``aggressive`` (RRT) or
            ``shallow-deep`` (FREE).
        exit_coef: ``aggressive``: weight of the intermediate exits.
        kd_alpha: ``shallow-deep``: weight of the layer-wise distillation.
        exit_norms: give each intermediate exit its own RMSNorm (initialised from the final).
        exit_classifier: give each intermediate exit a confidence classifier.
        exit_adapter_rank: give each intermediate exit a residual adapter of this rank
            (``ExitConfig.adapter_rank``; 0: none).
        train_only: train only parameters whose names start with one of these prefixes
            (e.g. ``exit_`` : the exits' adapters and norms); everything else is frozen.
            None trains everything.
        teacher: ``--objective uptrain``: the dense model distilled from.
        distill_weight: ``uptrain``: weight of KL(teacher || student) next to the LM loss.
        flops_budget: set ``steps`` so the run spends this many forward FLOPs (MoR's
            accountant, ``training/flops.py``): equal-compute comparisons.
        doc_mask: attend only within each document of a packed window (documents end with
            the end-of-text token); off by default, as in the recipes' measured runs.
    """

    data: str = "data/stdlib"
    out: str = "runs/stdlib-small"
    model: str = "stdlib-small"
    init_from: str | None = None
    objective: str = "lm"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = _choice("cosine", SCHEDULES)
    warmup_steps: int = 50
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = _choice("auto", PRECISIONS)
    eval_every: int = 100
    eval_batches: int = 16
    save_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    nonfinite: str = _choice("stop", NONFINITE)
    device: str = "auto"
    threads: int = 0
    fsdp: bool = False
    stop_at_step: int = -1
    exit_steps: tuple[int, ...] | None = None
    exit_loss: str = _choice("shallow-deep", EXIT_LOSSES)
    exit_coef: float = 0.1
    kd_alpha: float = 0.5
    exit_norms: bool = False
    exit_classifier: bool = False
    exit_adapter_rank: int | None = None
    train_only: tuple[str, ...] | None = None
    teacher: str | None = None
    distill_weight: float = 1.0
    flops_budget: float | None = None
    doc_mask: bool = False

    def validate(self) -> TrainConfig:
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        for f in fields(self):
            if "choices" in f.metadata:
                check_choice(f.name, getattr(self, f.name))
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ConfigError("min_lr_ratio must be in [0, 1] and decay_fraction in (0, 1]")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        """A run from a JSON file (a recipe's format: TrainConfig fields plus an optional
        ``description``), ``overrides`` (command-line flags) on top; strictly checked."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        _, data = split_description(data, str(path))
        try:
            return parse_dataclass(cls, {**data, **overrides}, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def check_choice(name: str, value: str) -> str:
    """``value`` if it is one of the choices of TrainConfig's field ``name``, else a
    ConfigError saying which are (``validate`` and the ``earlyexit train`` flags both ask)."""
    if name == "precision" and value == "float16":
        # fp16 training needs dynamic loss scaling (and its state in every checkpoint for
        # exact resume); bf16 has fp32's range and the same speed where it exists
        raise ConfigError(
            "float16 training is not supported: use --precision bfloat16 (fp32 master weights)"
        )
    choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
