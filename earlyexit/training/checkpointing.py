"""The run directory as the loop writes it: step checkpoints with their resume fingerprint,
the optimizer state restored across a resume, the chat template a fine-tune keeps,
``train_config.json`` and ``metrics.jsonl``. The files themselves (atomic writes, ``latest``,
pruning, RNG states, the run lock) are ``state.py``'s."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import torch.distributed as dist

from earlyexit.config import ModelConfig
from earlyexit.errors import TrainingError
from earlyexit.io.registry import resolve_model
from earlyexit.training.config import TrainConfig
from earlyexit.training.distributed import Dist
from earlyexit.training.state import save_training_checkpoint


def fingerprint(cfg: TrainConfig, mc: ModelConfig, d: Dist) -> dict:
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


def check_fingerprint(ckpt: Path, state: dict, fingerprint: dict) -> None:
    old = state.get("fingerprint", {})
    changed = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
    if changed:
        raise TrainingError(
            f"{ckpt}: cannot resume: {', '.join(changed)} differ from the run being resumed "
            f"(start a new run with another --out, or restore the original settings)"
        )


def load_optimizer(ckpt: Path, model, optimizer, optim_state: dict) -> None:
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


def save_step(
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


def chat_files(cfg: TrainConfig) -> dict[str, str] | None:
    """A fine-tuned model keeps the chat template of the model it started from."""
    from earlyexit.chat import chat_files as files_of
    from earlyexit.chat import load_chat_config

    return files_of(load_chat_config(resolve_model(cfg.init_from))) if cfg.init_from else None


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    path.write_text("".join(ln + "\n" for ln in keep))


def write_run_config(run: Path, cfg: TrainConfig, precision: str, world: int) -> None:
    """``train_config.json``: the run's settings as resolved, for whoever reads the run later."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "train_config.json").write_text(
        json.dumps(
            {
                **dataclasses.asdict(cfg),
                "precision_resolved": precision,
                "world_size": world,
                "git": git_revision(),
            },
            indent=1,
        )
        + "\n"
    )
