"""Draft files: a trained draft exit saved apart from the model it drafts for, and attached
to that model at load time (issue 28).

A draft directory holds ``draft.safetensors`` (the exit's attention adapter and norm, a few
MB) and ``draft.json``: the exit step, the pruned draft vocabulary (token ids), the decoding
defaults it was tuned with (``k``, ``stop``), a fingerprint of the model it was trained on
(shape + a hash of sampled weights) and a record of its training (data, budget, held-out
acceptance). :func:`attach` refuses a draft whose fingerprint does not match, naming what
differs. The SmolLM2 draft ships inside the package (``earlyexit/draft_files/smollm2``) and is
attached by ``earlyexit.load("smollm2")``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyexit.errors import CheckpointError, InputError

DRAFT_JSON = "draft.json"
DRAFT_WEIGHTS = "draft.safetensors"
DRAFT_FORMAT = 1
SHIPPED = Path(__file__).parent / "draft_files"  # drafts shipped with the package


@dataclass
class DraftSpec:
    """A draft attached to a model: where it exits and how to decode with it."""

    exit_step: int
    vocab: torch.Tensor  # (N,) token ids the draft head scores
    k: int = 4
    stop: float | str = 0.0  # a draft probability, or "adaptive"
    stop_prior: dict | None = None  # AdaptiveStop's starting counts, from the draft's calibration
    source: str = ""
    record: dict = dataclasses.field(default_factory=dict)


def save_draft(
    model,
    out: str | Path,
    vocab: torch.Tensor,
    k: int,
    stop: float | str,
    record: dict,
    stop_prior: dict | None = None,
) -> Path:
    """Write the draft exit of ``model`` (one exit with an attention adapter) to ``out``,
    atomically (``files.atomic_dir``)."""
    from safetensors.torch import save_file

    from earlyexit.files import atomic_dir
    from earlyexit.training.draft import draft_parameters, model_fingerprint

    steps = model.config.exits.steps
    if len(steps) != 1 or not model.config.exits.attention:
        raise InputError("a draft is one exit with an attention adapter")
    meta = {
        "format": DRAFT_FORMAT,
        "exit_step": steps[0],
        "adapter_rank": model.config.exits.adapter_rank,
        "k": k,
        "stop": stop,
        "model": model_fingerprint(model),
        "vocab": [int(t) for t in vocab.tolist()],
        "stop_prior": stop_prior,
        "record": record,
    }
    tensors = {k_: v.detach().contiguous().cpu() for k_, v in draft_parameters(model).items()}
    with atomic_dir(out, marker=DRAFT_JSON) as tmp:
        save_file(tensors, str(tmp / DRAFT_WEIGHTS))
        (tmp / DRAFT_JSON).write_text(json.dumps(meta) + "\n")
    return Path(out)


def read_draft(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``draft.json`` and the tensors of a draft directory; :class:`CheckpointError` when it
    is missing, unreadable or of another format."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / DRAFT_JSON).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a draft directory (no {DRAFT_JSON})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / DRAFT_JSON}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != DRAFT_FORMAT:
        raise CheckpointError(f"{path / DRAFT_JSON}: not a draft of format {DRAFT_FORMAT}")
    try:
        tensors = load_file(str(path / DRAFT_WEIGHTS))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path / DRAFT_WEIGHTS}: unreadable ({e})") from None
    return meta, tensors


def attach(model, path: str | Path):
    """``model`` with the draft at ``path`` as its (only) exit: a new :class:`Decoder`
    sharing the body's tensors, with ``model.draft`` set to its :class:`DraftSpec`.

    Raises:
        CheckpointError: the draft is unreadable, or was trained for another model (the
            message names each field that differs).
    """
    from earlyexit.config import ExitConfig
    from earlyexit.models.decoder import Decoder
    from earlyexit.training.draft import model_fingerprint

    path = Path(path)
    meta, tensors = read_draft(path)
    if model.routers is not None:
        raise InputError(
            "drafts attach to models with a fixed depth, not Mixture-of-Recursions models"
        )
    mine, theirs = model_fingerprint(model), meta.get("model", {})
    diff = [
        f"{k}: draft {theirs.get(k)!r}, model {v!r}"
        for k, v in mine.items()
        if k != "name" and theirs.get(k) != v
    ]
    if diff:
        raise CheckpointError(
            f"{path}: this draft was trained for another model ({theirs.get('name')!r}); "
            + "; ".join(diff)
        )
    cfg = dataclasses.replace(
        model.config,
        exits=ExitConfig(
            steps=(int(meta["exit_step"]),),
            norms=True,
            attention=True,
            adapter_rank=int(meta.get("adapter_rank", 0)),
            trained=True,
        ),
    )
    with torch.device("meta"):
        new = Decoder(cfg)
    ref = model.tok_embeddings.weight
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("exit_")}
    state.update({k: v.to(ref.device, ref.dtype) for k, v in tensors.items()})
    expected = set(new.state_dict())
    if set(state) != expected:
        bad = sorted(set(state) ^ expected)[:4]
        raise CheckpointError(
            f"{path / DRAFT_WEIGHTS}: tensors do not fit the draft's config: {bad}"
        )
    try:
        new.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / DRAFT_WEIGHTS}: {e}") from None
    new.rebuild_buffers(ref.device)
    new.eval()
    new.draft = DraftSpec(
        exit_step=int(meta["exit_step"]),
        vocab=torch.as_tensor(meta["vocab"], dtype=torch.long),
        k=int(meta.get("k", 4)),
        stop=meta.get("stop", 0.0)
        if meta.get("stop") == "adaptive"
        else float(meta.get("stop", 0.0)),
        stop_prior=meta.get("stop_prior"),
        source=str(path),
        record=meta.get("record", {}),
    )
    return new


def shipped_draft(name: str) -> Path | None:
    """The draft shipped with the package for named model ``name``, if any."""
    p = SHIPPED / name
    return p if (p / DRAFT_JSON).is_file() else None


def calibrate_stop(model, prompts: list[list[int]], new_tokens: int = 64, k: int = 4) -> dict:
    """Run speculation with the adaptive stop rule from ``model``'s attached draft over
    ``prompts`` (token ids; the draft's training prompts, never evaluation ones) and return
    the rule's counts as a prior (:meth:`AdaptiveStop.prior`), so that a fresh process starts
    calibrated instead of spending its first rounds learning."""
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.decoding.strategies import make_strategy

    s = make_strategy(model, "speculative", draft_k=k, draft_stop="adaptive")
    with torch.inference_mode():
        generate(
            model, prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), strategy=s
        )
    return s.rule.prior()
