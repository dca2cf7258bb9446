"""``earlyexit train``: one training loop for every objective, on one process or many.

- Model from a preset or a config file (from scratch) or an existing checkpoint
  (``init_from``); the vocabulary is taken from the prepared data's tokenizer.
- AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only: not on norms, biases or
  embeddings), warmup + cosine or warmup-stable-decay, gradient clipping, gradient
  accumulation, optional bf16 autocast with fp32 master weights.
- The objective is pluggable (``training/losses.py``): the loop only backpropagates
  ``objective(model, inputs, targets).loss``.
- Periodic validation NLL, a progress bar (loss, lr, tokens/s, ETA), ``metrics.jsonl``, and
  atomic checkpoints every ``save_every`` steps keeping the last ``keep_last``
  (``training/state.py``).
- Exact resume: model, optimizer moments, step, data position (one integer; the batch
  order is a pure function of it) and RNG states are restored, so a resumed run retraces
  the uninterrupted one (tested to 1e-6 in fp32).
- Multi-process: the same entry point under ``torchrun`` uses DDP (gloo on CPU, NCCL on
  GPU) or FSDP2 (``fsdp=True``). Rank r reads its slice of each global batch, so
  R ranks x batch b equals 1 rank x batch R*b.
- A NaN/inf loss stops with the step and a hint (or skips the step, ``nonfinite="skip"``);
  the last good checkpoint is never touched.

This module is the loop itself; what it calls lives beside it, named by what it does:
``config.py`` (``TrainConfig``), ``recipes.py`` (named runs from ``earlyexit/recipes/``),
``model_setup.py`` (the model and its parameter groups), ``distributed.py`` (process group,
DDP/FSDP2), ``checkpointing.py`` (step checkpoints, resume fingerprint, metrics files),
``evaluation.py`` (validation NLL), ``mfu.py`` (FLOPs per token, MFU), ``losses.py`` /
``exit_losses.py`` (the objectives), ``data.py`` (batches), ``state.py`` (files on disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from earlyexit.config import ModelConfig
from earlyexit.device import resolve_device, resolve_precision
from earlyexit.errors import InputError, TrainingError
from earlyexit.io.checkpoint import save_checkpoint
from earlyexit.models.decoder import Decoder
from earlyexit.progress import progress as progress_bar
from earlyexit.tokenizer import Tokenizer
from earlyexit.training.checkpointing import (
    append_metrics,
    check_fingerprint,
    fingerprint,
    load_optimizer,
    save_step,
    truncate_metrics,
    write_run_config,
)
from earlyexit.training.checkpointing import chat_files as _chat_files
from earlyexit.training.config import TrainConfig
from earlyexit.training.data import (
    TrainBatches,
    Windows,
    document_segments,
    load_manifest,
    token_file,
)
from earlyexit.training.distributed import Dist, all_mean, full_model, setup_distributed, wrap
from earlyexit.training.evaluation import validation_nll
from earlyexit.training.losses import get_objective
from earlyexit.training.mfu import flops_per_token, matmul_peak, model_flops_utilization
from earlyexit.training.model_setup import (
    build_config,
    exit_config,
    freeze_all_but,
    initial_model,
    param_groups,
    with_exits,
)
from earlyexit.training.objective import Objective
from earlyexit.training.recipes import RECIPES
from earlyexit.training.schedule import lr_at
from earlyexit.training.state import latest_checkpoint, load_training_state, lock_run, restore_rng

# What used to be defined here stays importable from here.
__all__ = [
    "RECIPES",
    "Dist",
    "TrainConfig",
    "TrainingError",
    "build_config",
    "exit_config",
    "flops_per_token",
    "freeze_all_but",
    "matmul_peak",
    "model_flops_utilization",
    "param_groups",
    "setup_distributed",
    "train",
    "with_exits",
]


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Run (or resume) a training run; returns a summary dict. See the module docstring."""
    cfg.validate()
    device = resolve_device(cfg.device)
    d = setup_distributed(device)
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    lock = lock_run(Path(cfg.out)) if d.main else None  # one trainer per run directory
    try:
        return _train(cfg, resume, progress, log, device, d)
    finally:
        if lock is not None:
            lock.close()


def _train(
    cfg: TrainConfig, resume: bool, progress: bool, log, device: torch.device, d: Dist
) -> dict:
    say = log if d.main else (lambda *a, **k: None)
    run = Path(cfg.out)
    manifest = load_manifest(cfg.data)
    tok_path = Path(cfg.data) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_path)
    train_w = Windows(token_file(cfg.data, "train"), cfg.seq_len)
    val_w = Windows(token_file(cfg.data, "val"), cfg.seq_len)
    eot_id = manifest["eot_id"]
    r = _set_up(cfg, run, resume, tokenizer, tok_path, eot_id, device, d, say)
    cfg, model, mc, optimizer, tokens_seen = r.cfg, r.model, r.mc, r.optimizer, r.tokens_seen

    # ------------------------------------------------------------------ bookkeeping
    precision, why = resolve_precision(cfg.precision, device)
    metrics = run / "metrics.jsonl"
    if d.main:
        write_run_config(run, cfg, precision, d.world)
        truncate_metrics(metrics, r.start_step)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * d.world
    fpt = flops_per_token(mc, cfg.seq_len)
    compute_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    batches = TrainBatches(train_w, cfg.batch_size, cfg.seed, d.rank, d.world)
    autocast = _autocast(precision, device)
    say(
        f"training {mc.name}: {mc.param_counts()['total'] / 1e6:.2f}M parameters, {d.world} process(es), "
        f"{tokens_per_step:,} tokens/step, steps {r.start_step}->{cfg.steps}"
    )
    say(f"precision: {precision} ({why})")
    peak = matmul_peak(device, compute_dtype) if d.main else 0.0

    # ------------------------------------------------------------------ the loop
    bar = progress_bar(
        progress and d.main, cfg.steps, f"train {run.name}", log=say, initial=r.start_step
    )
    skipped, last_eval = 0, None
    t_start, tok_start = time.perf_counter(), tokens_seen
    completed = r.start_step
    for step in range(r.start_step, cfg.steps):
        lr = _set_lr(optimizer, step, cfg)
        loss_value, extra = _accumulate_gradients(r, batches, step, eot_id, autocast, device, d)
        if not math.isfinite(loss_value):
            if cfg.nonfinite == "stop":
                last = latest_checkpoint(run)
                raise TrainingError(
                    f"non-finite loss ({loss_value}) at step {step + 1}; try a lower --lr, "
                    f"--grad-clip 1.0 or --precision float32. Last good checkpoint: {last or 'none'}"
                )
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            say(f"step {step + 1}: non-finite loss, step skipped ({skipped} so far)")
            continue
        gnorm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        done = completed = step + 1
        elapsed = time.perf_counter() - t_start
        tps = (tokens_seen - tok_start) / max(elapsed, 1e-9)
        bar.update(1, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tokens_per_s=f"{tps:,.0f}")
        if d.main and (done % cfg.log_every == 0 or done == cfg.steps or done == 1):
            append_metrics(
                metrics,
                {
                    "step": done,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": float(gnorm),
                    "tokens": tokens_seen,
                    "tokens_per_s": tps,
                    "mfu": model_flops_utilization(tps, fpt, peak),
                    "elapsed_s": elapsed,
                    **{k: float(v) for k, v in extra.items()},
                    "skipped": skipped,
                },
            )
        if (cfg.eval_every > 0 and done % cfg.eval_every == 0) or done == cfg.steps:
            last_eval = validation_nll(model, val_w, cfg, device, d)
            if d.main:
                ppl = math.exp(min(last_eval, 50))
                row = {"step": done, "val_nll": last_eval, "val_ppl": ppl, "tokens": tokens_seen}
                append_metrics(metrics, row)
                bar.write(f"step {done}: val nll {last_eval:.4f} (ppl {ppl:.2f})")
        if (cfg.save_every > 0 and done % cfg.save_every == 0) or done == cfg.steps:
            save_step(run, done, tokens_seen, model, optimizer, mc, tok_path, cfg, r.fingerprint, d)
        if cfg.stop_at_step > 0 and done >= cfg.stop_at_step and done < cfg.steps:
            say(f"stopping at step {done} (--stop-at-step)")
            break
    bar.close()

    # ------------------------------------------------------------------ the end
    finished = completed >= cfg.steps
    if finished and last_eval is None:  # resumed a run that had already finished
        last_eval = validation_nll(model, val_w, cfg, device, d)
    if finished:
        final = full_model(model, mc)  # a collective: every rank takes part, rank 0 gets it
        if d.main:
            save_checkpoint(final, run / "final", tokenizer, extra_files=_chat_files(cfg))
    if d.world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - t_start
    tps = (tokens_seen - tok_start) / max(elapsed, 1e-9)
    return {
        "run": str(run),
        "steps": completed,
        "finished": finished,
        "val_nll": last_eval,
        "tokens": tokens_seen,
        "tokens_per_s": tps,
        "mfu": model_flops_utilization(tps, fpt, peak),
        "precision": precision,
        "matmul_peak_flops": peak,
        "flops_per_token": fpt,
        "skipped_steps": skipped,
        "final": str(run / "final") if finished else None,
    }


@dataclass
class _Run:
    """A run ready for its first step: the config (``steps`` set by a FLOP budget), the model
    and its wrapped view (DDP/FSDP2), the objective, the optimizer, and where it starts."""

    cfg: TrainConfig
    model: Decoder
    net: torch.nn.Module
    mc: ModelConfig
    objective: Objective
    optimizer: torch.optim.Optimizer
    fingerprint: dict
    start_step: int
    tokens_seen: int


def _set_up(cfg, run, resume, tokenizer, tok_path, eot_id, device, d, say) -> _Run:
    """The model, objective and optimizer: fresh, fine-tuned from ``init_from``, or (with
    ``resume``) restored from the run's latest checkpoint with optimizer moments, step, data
    position and RNG states, after checking the settings that exact resume depends on."""
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:
        say(f"{run}: no checkpoint to resume from; starting from scratch")
    if not resume and (run / "latest").exists():
        raise InputError(
            f"{run}: already holds a run; pass --resume to continue it or choose another --out"
        )
    model, mc = initial_model(cfg, ckpt, tokenizer, tok_path, eot_id, device)
    if cfg.seq_len > mc.max_context:
        raise InputError(f"--seq-len {cfg.seq_len} exceeds the model's context ({mc.max_context})")
    if cfg.flops_budget:
        from earlyexit.training.flops import steps_for_budget

        tokens_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * d.world
        cfg = dataclasses.replace(
            cfg, steps=max(1, steps_for_budget(cfg.flops_budget, mc, cfg.seq_len, tokens_step))
        )
        say(f"--flops-budget {cfg.flops_budget:.3g}: {cfg.steps} steps")
    fp = fingerprint(cfg, mc, d)
    state = None
    if ckpt is not None:
        model_state, optim_state, state = load_training_state(ckpt, device)
        check_fingerprint(ckpt, state, fp)
        model.load_state_dict(model_state, strict=True)
    objective = get_objective(cfg.objective, cfg)
    objective.setup(model)
    if cfg.train_only:
        frozen = freeze_all_but(model, cfg.train_only)
        say(f"--train-only {','.join(cfg.train_only)}: {frozen} parameter tensors frozen")
    net = wrap(model, cfg.fsdp, d, device)  # FSDP2 swaps parameters: build the optimizer after
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
    )
    start_step, tokens_seen = 0, 0
    if ckpt is not None:
        load_optimizer(ckpt, model, optimizer, optim_state)
        restore_rng(ckpt, state)
        start_step, tokens_seen = state["step"], state["tokens"]
        say(f"resuming {run} from {ckpt.name} (step {start_step})")
    return _Run(cfg, model, net, mc, objective, optimizer, fp, start_step, tokens_seen)


def _autocast(precision: str, device: torch.device):
    """The context each forward runs in: bf16 autocast (fp32 master weights) or nothing."""
    if precision == "bfloat16":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """The schedule's learning rate at ``step``, set on every group (times its ``lr_scale``)."""
    lr = lr_at(
        step,
        lr=cfg.lr,
        steps=cfg.steps,
        warmup=cfg.warmup_steps,
        schedule=cfg.schedule,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_fraction=cfg.decay_fraction,
    )
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def _accumulate_gradients(
    r: _Run, batches: TrainBatches, step: int, eot_id: int, autocast, device, d: Dist
) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward and backward over the step's ``grad_accum`` micro-batches; returns the step's
    loss (mean over micro-batches and ranks) and the objective's metrics (mean per step)."""
    cfg, net = r.cfg, r.net
    loss_sum = torch.zeros((), device=device)
    extra: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        x, y = batches.batch(step * cfg.grad_accum + micro)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP: all-reduce gradients only on the last micro-batch of the step
        last = micro == cfg.grad_accum - 1
        sync = (
            net.no_sync()
            if (d.world > 1 and not cfg.fsdp and not last)
            else contextlib.nullcontext()
        )
        docs = (
            r.model.documents(document_segments(x, eot_id))
            if cfg.doc_mask
            else contextlib.nullcontext()
        )
        with sync:
            with autocast(), docs:
                out = r.objective(net, x, y)
            (out.loss / cfg.grad_accum).backward()
        loss_sum += out.loss.detach()
        for k, v in out.metrics.items():  # objective-specific metrics, averaged per step
            extra[k] = extra.get(k, 0.0) + v / cfg.grad_accum
    loss = all_mean(loss_sum / cfg.grad_accum, d)
    return loss.item(), extra
