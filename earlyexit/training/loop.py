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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from earlyexit.checkpoint import load_checkpoint, load_config, save_checkpoint
from earlyexit.config import ExitConfig, ModelConfig
from earlyexit.device import resolve_device, resolve_precision
from earlyexit.errors import ConfigError, InputError, TrainingError
from earlyexit.models.decoder import Decoder
from earlyexit.models.layers import RMSNorm
from earlyexit.progress import progress as progress_bar
from earlyexit.registry import resolve_model
from earlyexit.tokenizer import Tokenizer
from earlyexit.training.config import TrainConfig
from earlyexit.training.data import (
    TrainBatches,
    Windows,
    document_segments,
    load_manifest,
    token_file,
    val_batches,
)
from earlyexit.training.losses import evaluate_nll, get_objective
from earlyexit.training.recipes import RECIPES  # noqa: F401  (re-exported: its old home)
from earlyexit.training.schedule import lr_at
from earlyexit.training.state import (
    latest_checkpoint,
    load_training_state,
    lock_run,
    restore_rng,
    save_training_checkpoint,
)


# ---------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group ``torchrun`` describes (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local)


def _all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


# ---------------------------------------------------------------------- model and optimizer
def build_config(cfg: TrainConfig, tokenizer: Tokenizer, eot: int) -> ModelConfig:
    """The model config: preset or file, with the vocabulary of the data's tokenizer."""
    over = {"vocab_size": tokenizer.vocab_size, "eos_token_ids": [eot]}
    if Path(cfg.model).suffix == ".json":
        mc = ModelConfig.load(cfg.model)
        data = mc.to_dict()
        data.pop("plan")
        return ModelConfig.from_dict({**data, **over}, source=cfg.model)
    return ModelConfig.from_name(cfg.model, **over)


def exit_config(current: ExitConfig, cfg: TrainConfig) -> ExitConfig:
    """The model's exits with the run's ``exit_*`` settings applied."""
    return dataclasses.replace(
        current,
        steps=current.steps if cfg.exit_steps is None else tuple(cfg.exit_steps),
        norms=current.norms or cfg.exit_norms,
        classifier=current.classifier or cfg.exit_classifier,
        adapter_rank=current.adapter_rank
        if cfg.exit_adapter_rank is None
        else cfg.exit_adapter_rank,
    )


def with_exits(model: Decoder, cfg: TrainConfig) -> Decoder:
    """``model`` with the run's exit settings; new per-exit norms start as copies of the
    final norm, new classifiers at random, everything else keeps its trained weights."""
    exits = exit_config(model.config.exits, cfg)
    if exits == model.config.exits:
        return model
    mc = dataclasses.replace(model.config, exits=exits)
    dev = model.tok_embeddings.weight.device
    new = Decoder(mc).to(dev)
    # new exit parts start from the run's seed: two runs of one recipe start identically
    new.init_weights(torch.Generator(device=dev).manual_seed(cfg.seed))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    exit_parts = ("exit_norms.", "exit_classifiers.", "exit_adapters.")
    stale = [k for k in unexpected if not k.startswith(exit_parts)]
    if stale or any(not k.startswith(exit_parts) for k in missing):
        raise ConfigError(f"cannot change the exits of {cfg.init_from}: {stale or missing}")
    if new.exit_norms is not None:
        for i, s in enumerate(mc.exits.steps):
            old = model.exit_index(s)
            src = model.norm if old is None or model.exit_norms is None else model.exit_norms[old]
            new.exit_norms[i].weight.data.copy_(src.weight.data)
    return new


def freeze_all_but(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Train only the parameters whose names start with one of ``prefixes``; returns how
    many parameter tensors were frozen. Refuses a pattern that matches nothing."""
    names = [n for n, _ in model.named_parameters()]
    for pre in prefixes:
        if not any(n.startswith(pre) for n in names):
            raise ConfigError(f"--train-only {pre!r} matches no parameter of this model")
    frozen = 0
    for n, p in model.named_parameters():
        keep = n.startswith(tuple(prefixes))
        p.requires_grad_(keep and p.requires_grad)
        frozen += not keep
    return frozen


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on linear matrices only; not on norms, biases or embeddings."""
    decay, no_decay = [], []
    no_decay_ids = set()
    for m in model.modules():
        if isinstance(m, (RMSNorm, torch.nn.Embedding)):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        offset = ".lora.norm." in name or ".lora.bias." in name  # relaxed norms and biases
        (no_decay if p.ndim < 2 or offset or id(p) in no_decay_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    aux = getattr(getattr(model, "routers", None), "aux", None)
    if aux is not None:  # MoR's auxiliary router: its own group at 10x the learning rate
        ids = {id(p) for p in aux.parameters()}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        groups.append({"params": list(aux.parameters()), "weight_decay": 0.0, "lr_scale": 10.0})
    return groups


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5
) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype``, measured here and now (for MFU): the best
    of ``reps`` timed calls after one warm-up, so a busy moment does not lower the peak (a
    low peak is what makes MFU come out above 1)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak: float):
    """Achieved / peak FLOP/s, or None when the peak is unknown or the ratio is impossible
    (above 1: the probe ran at a slower moment than the step; reporting it would be a lie)."""
    if not peak:
        return None
    mfu = tokens_per_s * flops_per_token / peak
    return mfu if mfu <= 1.0 else None


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters run per token (shared blocks count
    once per step) + 6 x layers x seq_len x d (causal attention scores and values)."""
    per_step = mc.block_params() - 2 * mc.d_model  # matmul weights of one block
    n = mc.n_layers * per_step + mc.vocab_size * mc.d_model  # + the head
    return 6 * n + 6 * mc.n_layers * seq_len * mc.q_dim


def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------- the loop
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

    # ------------------------------------------------------------------ model
    start_step, tokens_seen = 0, 0
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None:
        say(f"{run}: no checkpoint to resume from; starting from scratch")
    if not resume and (run / "latest").exists():
        raise InputError(
            f"{run}: already holds a run; pass --resume to continue it or choose another --out"
        )
    if ckpt is not None:  # resuming: the run's own config (its weights come below)
        mc = load_config(ckpt)
        model = Decoder(mc).to(device)
        model.train()
    elif cfg.init_from:
        model, _ = load_checkpoint(resolve_model(cfg.init_from), device)
        model = with_exits(model, cfg)
        model.train()
        mc = model.config
        if tokenizer.vocab_size > mc.vocab_size:
            raise InputError(
                f"{tok_path}: {tokenizer.vocab_size} tokens do not fit the vocabulary of {cfg.init_from} ({mc.vocab_size})"
            )
    else:
        mc = build_config(cfg, tokenizer, manifest["eot_id"])
        mc = dataclasses.replace(mc, exits=exit_config(mc.exits, cfg))
        torch.manual_seed(cfg.seed)
        model = Decoder(mc).to(device)
        model.init_weights(torch.Generator(device=device).manual_seed(cfg.seed))
        model.train()
    if cfg.seq_len > mc.max_context:
        raise InputError(f"--seq-len {cfg.seq_len} exceeds the model's context ({mc.max_context})")
    if cfg.flops_budget:
        from earlyexit.training.flops import steps_for_budget

        tokens_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * d.world
        cfg = dataclasses.replace(
            cfg, steps=max(1, steps_for_budget(cfg.flops_budget, mc, cfg.seq_len, tokens_step))
        )
        say(f"--flops-budget {cfg.flops_budget:.3g}: {cfg.steps} steps")
    fingerprint = _fingerprint(cfg, mc, d)
    state = None
    if ckpt is not None:
        model_state, optim_state, state = load_training_state(ckpt, device)
        _check_fingerprint(ckpt, state, fingerprint)
        model.load_state_dict(model_state, strict=True)
    objective = get_objective(cfg.objective, cfg)
    objective.setup(model)
    if cfg.train_only:
        frozen = freeze_all_but(model, cfg.train_only)
        say(f"--train-only {','.join(cfg.train_only)}: {frozen} parameter tensors frozen")
    net = _wrap(model, cfg, d, device)  # FSDP2 swaps parameters: build the optimizer after
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
    )
    if ckpt is not None:
        _load_optimizer(ckpt, model, optimizer, optim_state)
        restore_rng(ckpt, state)
        start_step, tokens_seen = state["step"], state["tokens"]
        say(f"resuming {run} from {ckpt.name} (step {start_step})")

    # ------------------------------------------------------------------ bookkeeping
    precision, why = resolve_precision(cfg.precision, device)
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "train_config.json").write_text(
            json.dumps(
                {
                    **dataclasses.asdict(cfg),
                    "precision_resolved": precision,
                    "world_size": d.world,
                    "git": _git_revision(),
                },
                indent=1,
            )
            + "\n"
        )
        _truncate_metrics(run / "metrics.jsonl", start_step)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len * d.world
    fpt = flops_per_token(mc, cfg.seq_len)
    compute_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    batches = TrainBatches(train_w, cfg.batch_size, cfg.seed, d.rank, d.world)
    eot_id = manifest["eot_id"]
    if precision == "bfloat16":  # fp32 master weights, bf16 compute
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    say(
        f"training {mc.name}: {mc.param_counts()['total'] / 1e6:.2f}M parameters, {d.world} process(es), "
        f"{tokens_per_step:,} tokens/step, steps {start_step}->{cfg.steps}"
    )
    say(f"precision: {precision} ({why})")
    peak = matmul_peak(device, compute_dtype) if d.main else 0.0

    bar = progress_bar(
        progress and d.main, cfg.steps, f"train {run.name}", log=say, initial=start_step
    )
    skipped, last_eval = 0, None
    t_start, tok_start = time.perf_counter(), tokens_seen
    completed = start_step
    for step in range(start_step, cfg.steps):
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
                model.documents(document_segments(x, eot_id))
                if cfg.doc_mask
                else contextlib.nullcontext()
            )
            with sync:
                with autocast(), docs:
                    out = objective(net, x, y)
                (out.loss / cfg.grad_accum).backward()
            loss_sum += out.loss.detach()
            for k, v in out.metrics.items():  # objective-specific metrics, averaged per step
                extra[k] = extra.get(k, 0.0) + v / cfg.grad_accum
        loss = _all_mean(loss_sum / cfg.grad_accum, d)
        loss_value = loss.item()
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
            _append(
                run / "metrics.jsonl",
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
            last_eval = _evaluate(model, val_w, cfg, device, d)
            if d.main:
                _append(
                    run / "metrics.jsonl",
                    {
                        "step": done,
                        "val_nll": last_eval,
                        "val_ppl": math.exp(min(last_eval, 50)),
                        "tokens": tokens_seen,
                    },
                )
                bar.write(
                    f"step {done}: val nll {last_eval:.4f} (ppl {math.exp(min(last_eval, 50)):.2f})"
                )
        if (cfg.save_every > 0 and done % cfg.save_every == 0) or done == cfg.steps:
            _save(run, done, tokens_seen, model, optimizer, mc, tok_path, cfg, fingerprint, d)
        if cfg.stop_at_step > 0 and done >= cfg.stop_at_step and done < cfg.steps:
            say(f"stopping at step {done} (--stop-at-step)")
            break
    bar.close()
    finished = completed >= cfg.steps
    if finished and last_eval is None:  # resumed a run that had already finished
        last_eval = _evaluate(model, val_w, cfg, device, d)
    if finished:
        final = _full_model(model, mc)  # a collective: every rank takes part, rank 0 gets it
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


def _chat_files(cfg: TrainConfig) -> dict[str, str] | None:
    """A fine-tuned model keeps the chat template of the model it started from."""
    from earlyexit.chat import chat_files, load_chat_config

    return chat_files(load_chat_config(resolve_model(cfg.init_from))) if cfg.init_from else None


def _wrap(model: torch.nn.Module, cfg: TrainConfig, d: Dist, device: torch.device):
    if d.world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _fingerprint(cfg: TrainConfig, mc: ModelConfig, d: Dist) -> dict:
    """What must not change across a resume for it to be exact."""
    model = {k: v for k, v in mc.to_dict().items() if k != "name"}
    # `trained` flips when the exit objective starts: bookkeeping, not part of the setup
    model["exits"] = {k: v for k, v in model["exits"].items() if k != "trained"}
    return {
        "model": model,
        "seq_len": cfg.seq_len,
        "global_batch": cfg.batch_size * d.world,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "objective": cfg.objective,
        "exit_loss": cfg.exit_loss if cfg.objective == "exits" else None,
        "teacher": cfg.teacher if cfg.objective == "uptrain" else None,
        "data": str(Path(cfg.data).resolve()),
    }


def _check_fingerprint(ckpt: Path, state: dict, fingerprint: dict) -> None:
    old = state.get("fingerprint", {})
    changed = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
    if changed:
        raise TrainingError(
            f"{ckpt}: cannot resume: {', '.join(changed)} differ from the run being resumed "
            f"(start a new run with another --out, or restore the original settings)"
        )


def _load_optimizer(ckpt: Path, model, optimizer, optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # frozen parameters (--train-only, exit-classifier training) have no optimizer state
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in names.values() if n not in optim_state["state"]]
    if missing:
        raise TrainingError(f"{ckpt}: optimizer state lacks {', '.join(missing[:3])}")
    groups = optimizer.state_dict()["param_groups"]
    optim_state["param_groups"] = [
        {
            **{k: v for k, v in g.items() if k != "params"},
            "params": [names[id(p)] for p in optimizer.param_groups[i]["params"]],
        }
        for i, g in enumerate(groups)
    ]
    set_optimizer_state_dict(
        model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
    )


def _full_model(model, mc: ModelConfig) -> Decoder | None:
    """A plain Decoder with the full weights on rank 0 (None elsewhere); gathers FSDP shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    if not sd:  # with cpu_offload only rank 0 receives the full state
        return None
    with torch.device("meta"):
        plain = Decoder(mc)
    plain.load_state_dict({k: v.detach().cpu() for k, v in sd.items()}, assign=True)
    plain.rebuild_buffers("cpu")
    return plain.eval()


def _save(
    run: Path, step: int, tokens: int, model, optimizer, mc, tok_path, cfg, fingerprint, d: Dist
) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)  # collective under FSDP: every rank calls it
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if d.main:
        state = {
            "step": step,
            "tokens": tokens,
            "micro_batch": step * cfg.grad_accum,
            "fingerprint": fingerprint,
        }
        save_training_checkpoint(run, step, msd, mc.to_dict(), tok_path, osd, state, cfg.keep_last)
    if d.world > 1:
        dist.barrier()


def _evaluate(model, val_w: Windows, cfg: TrainConfig, device, d: Dist) -> float:
    """Validation NLL on every rank's copy (identical data; FSDP needs all ranks anyway)."""
    model.eval()
    try:
        nll, _ = evaluate_nll(model, val_batches(val_w, cfg.batch_size, cfg.eval_batches))
    finally:
        model.train()
    return nll


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))
