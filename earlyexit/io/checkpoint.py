"""Checkpoints in the contract format: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

- Saving is atomic (``files.atomic_dir``): everything is written into a temporary sibling
  directory, fsynced, and renamed into place, so a kill at any moment leaves either the old
  or the new checkpoint.
- Loading validates before it allocates: a missing directory, a Hugging Face directory given
  where ours is expected, a newer format version, a corrupt or truncated safetensors file,
  and missing, unexpected or mis-shaped tensors each raise :class:`CheckpointError` naming
  the file and the tensor. Weights are only ever read through safetensors, never pickle.
- The model is built on the meta device and the tensors are assigned in place, converted to
  the target dtype one by one and read straight onto the target device: no second copy of
  the model in host memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from earlyexit.config import FORMAT_VERSION, ModelConfig
from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.files import atomic_dir
from earlyexit.models.decoder import Decoder
from earlyexit.tokenizer import Tokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


def save_checkpoint(
    model: Decoder,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``out_dir`` atomically, replacing what is there."""
    with atomic_dir(out_dir) as tmp:
        cfg = {"format_version": FORMAT_VERSION, **model.config.to_dict()}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        meta = {"format": "pt", "earlyexit_format_version": str(FORMAT_VERSION)}
        save_file(state, str(tmp / WEIGHTS), metadata=meta)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        for name, content in (extra_files or {}).items():
            _write(tmp / name, content)
    return Path(out_dir)


def _write(path: Path, content: str | bytes) -> None:
    path.write_bytes(content.encode() if isinstance(content, str) else content)


# ---------------------------------------------------------------------- loading
def load_config(ckpt_dir: str | Path) -> ModelConfig:
    """Read and validate ``config.json`` of an earlyexit checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise CheckpointError(f"{ckpt_dir}: no such directory")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: not a directory (expected a checkpoint directory)")
    path = ckpt_dir / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not an earlyexit checkpoint (no {CONFIG})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "format_version" not in data:
        if "model_type" in data or "architectures" in data:
            raise CheckpointError(
                f"{ckpt_dir}: this is a Hugging Face model directory; convert it first with "
                f"`earlyexit convert hf-import {ckpt_dir} OUT_DIR`"
            )
        raise CheckpointError(f"{path}: missing 'format_version'; not an earlyexit config")
    version = data.pop("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this earlyexit supports "
            f"({FORMAT_VERSION}); upgrade earlyexit"
        )
    try:
        return ModelConfig.from_dict(data, source=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_safetensors(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file on ``device`` (floating ones cast to ``dtype``),
    each in memory of its own.

    On the CPU, safetensors hands out views into its memory map of the file, at whatever
    offset the tensor has in it (8-byte aligned only). Decoding from such weights measured
    3x slower than from the same weights in ordinary memory (SmolLM2-135M: every matmul
    streams misaligned, page-faulting, file-backed pages). So each tensor is copied, one at
    a time, into a fresh allocation (PyTorch's CPU allocator aligns to 64 bytes) and the view
    is dropped: the peak stays one model plus the page cache, never two models.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_tensor(name)
                want = dtype if dtype is not None and t.is_floating_point() else t.dtype
                if t.device.type == "cpu":
                    t = torch.empty(t.shape, dtype=want).copy_(t)  # owned and aligned
                elif t.dtype != want:
                    t = t.to(want)
                out[name] = t
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return out


def build_model(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    source: str,
    device: torch.device | str = "cpu",
) -> Decoder:
    """A :class:`Decoder` whose parameters are exactly ``state`` (validated by name and shape)."""
    with torch.device("meta"):
        model = Decoder(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor(s) {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {', '.join(unexpected[:5])}"
            + (" ..." if len(unexpected) > 5 else "")
        )
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)} from config.json"
            )
        if not state[k].is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {k} has dtype {state[k].dtype}, expected floating point"
            )
    model.load_state_dict(state, assign=True, strict=True)
    model.rebuild_buffers(device)  # non-persistent buffers were created on the meta device
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"{source}: tensor {name} was not loaded")
    return model.eval()


def load_checkpoint(
    ckpt_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Decoder, Tokenizer | None]:
    """Load an earlyexit checkpoint directory: the model (in eval mode) and its tokenizer.

    Args:
        ckpt_dir: directory with config.json, model.safetensors and optionally tokenizer.json.
        device: where the weights go (read straight there).
        dtype: floating dtype of the weights (default: as stored).

    Raises:
        CheckpointError: anything wrong with the directory, naming the file and tensor.
    """
    ckpt_dir = Path(ckpt_dir)
    config = load_config(ckpt_dir)
    state = read_safetensors(ckpt_dir / WEIGHTS, device, dtype)
    model = build_model(config, state, str(ckpt_dir / WEIGHTS), device)
    tokenizer = None
    if (ckpt_dir / TOKENIZER).is_file():
        tokenizer = Tokenizer.from_file(ckpt_dir / TOKENIZER)
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(
                f"{ckpt_dir / TOKENIZER}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                f"vocabulary has {config.vocab_size}; they do not belong together"
            )
    return model, tokenizer
