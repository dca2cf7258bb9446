"""Run directories and resumable training state, without pickle.

A run directory holds::

    train_config.json          the resolved TrainConfig (+ git revision, world size)
    metrics.jsonl              one JSON object per logged step / evaluation
    checkpoints/step-000200/   a checkpoint in the contract format, plus
        training_state/optimizer.safetensors   AdamW moments and step counts, by parameter name
        training_state/rng.safetensors         torch RNG states
        training_state/state.json              step, data position, tokens seen, RNG (python, numpy)
    latest                     the name of the newest complete checkpoint
    final/                     the final model (contract format, no training state)

Every checkpoint directory is written with ``files.atomic_dir`` (temp + fsync +
rename); ``latest`` is replaced by an atomic rename only after its checkpoint is complete,
and old checkpoints are pruned only after that. A kill at any moment therefore leaves
``latest`` naming a complete, loadable checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from earlyexit.config import FORMAT_VERSION
from earlyexit.errors import CheckpointError
from earlyexit.files import atomic_dir, atomic_write
from earlyexit.io.checkpoint import CONFIG, TOKENIZER, WEIGHTS, read_safetensors

STATE_DIR = "training_state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def lock_run(run: Path):
    """Hold an exclusive lock on ``run`` for this process's lifetime (released by the OS on
    exit, kill -9 included). A second trainer on the same run directory is refused."""
    import fcntl

    run.mkdir(parents=True, exist_ok=True)
    f = open(run / ".lock", "w")  # noqa: SIM115 (kept open: the lock lives as long as the file)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise CheckpointError(
            f"{run}: another training process is using this run directory"
        ) from None
    return f


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


def is_complete(ckpt: Path) -> bool:
    s = ckpt / STATE_DIR
    files = (
        ckpt / CONFIG,
        ckpt / WEIGHTS,
        *(s / f for f in ("state.json", "optimizer.safetensors", "rng.safetensors")),
    )
    return all(p.is_file() for p in files)


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one if ``latest`` is missing."""
    pointer = run / "latest"
    if pointer.is_file():
        ckpt = run / "checkpoints" / pointer.read_text().strip()
        if is_complete(ckpt):
            return ckpt
    steps = sorted(
        (int(m.group(1)), p)
        for p in (run / "checkpoints").glob("step-*")
        if (m := _STEP_DIR.match(p.name)) and is_complete(p)
    )
    return steps[-1][1] if steps else None


def save_training_checkpoint(
    run: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    config_dict: dict,
    tokenizer_path: Path | None,
    optim_state: dict,
    state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune old ones."""
    ckpt = step_dir(run, step)
    try:
        with atomic_dir(ckpt) as tmp:
            (tmp / CONFIG).write_text(
                json.dumps({"format_version": FORMAT_VERSION, **config_dict}, indent=2) + "\n"
            )
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                str(tmp / WEIGHTS),
                metadata={"format": "pt"},
            )
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
            sdir = tmp / STATE_DIR
            sdir.mkdir()
            tensors = {}
            for name, st in optim_state["state"].items():
                for key, val in st.items():
                    t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
                    tensors[f"{name}/{key}"] = t.detach().contiguous().cpu()
            save_file(tensors, str(sdir / "optimizer.safetensors"))
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                for i, s in enumerate(torch.cuda.get_rng_state_all()):
                    rng[f"torch_cuda_{i}"] = s
            save_file(rng, str(sdir / "rng.safetensors"))
            full = {
                **state,
                "python_rng": _py_rng_to_json(random.getstate()),
                "numpy_rng": _np_rng_to_json(np.random.get_state()),
            }
            (sdir / "state.json").write_text(json.dumps(full, indent=1) + "\n")
        _point_latest(run, ckpt.name)
    except OSError as e:
        raise CheckpointError(
            f"{ckpt}: could not write the checkpoint ({e.strerror or e}); the previous checkpoint is intact"
        ) from None
    _prune(run, keep_last)
    return ckpt


def _point_latest(run: Path, name: str) -> None:
    atomic_write(run / "latest", name + "\n")


def _prune(run: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(
        (int(m.group(1)), p)
        for p in (run / "checkpoints").glob("step-*")
        if (m := _STEP_DIR.match(p.name))
    )
    latest = (run / "latest").read_text().strip() if (run / "latest").is_file() else None
    for _, p in steps[:-keep_last]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)
    for junk in (run / "checkpoints").glob(".step-*"):  # temp dirs of a killed save
        shutil.rmtree(junk, ignore_errors=True)


def load_training_state(ckpt: Path, device: torch.device) -> tuple[dict, dict, dict]:
    """(model state, optimizer state in ``get_optimizer_state_dict`` layout, state.json)."""
    model_state = read_safetensors(ckpt / WEIGHTS, device)
    sdir = ckpt / STATE_DIR
    try:
        flat = load_file(str(sdir / "optimizer.safetensors"), device=str(device))
        state = json.loads((sdir / "state.json").read_text())
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{sdir}: unreadable training state ({e})") from None
    optim: dict[str, dict] = {}
    for key, t in flat.items():
        name, k = key.rsplit("/", 1)
        optim.setdefault(name, {})[k] = t
    return model_state, {"state": optim}, state


def restore_rng(ckpt: Path, state: dict) -> None:
    rng = load_file(str(ckpt / STATE_DIR / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_py_rng_from_json(state["python_rng"]))
    np.random.set_state(_np_rng_from_json(state["numpy_rng"]))


def _py_rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _py_rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])


def _np_rng_to_json(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def _np_rng_from_json(s):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])
