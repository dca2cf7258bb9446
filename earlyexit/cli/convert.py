"""``earlyexit convert``: between Hugging Face, GGUF and earlyexit checkpoints, dense and recursive."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from earlyexit.cli import choices
from earlyexit.errors import InputError


def register(sub) -> None:
    """Add ``earlyexit convert`` and its flags to the subcommand parsers ``sub``."""
    c = sub.add_parser("convert", help="convert between Hugging Face and earlyexit checkpoints")
    c.add_argument(
        "kind",
        choices=["hf-import", "gguf-import", "hf-export", "recursive", "merge"],
        help="hf-import: HF directory or hub name -> ours (a .gguf file is read as gguf-import); "
        "gguf-import: a llama.cpp GGUF file (dequantized) -> ours, with its tokenizer and chat "
        "template; hf-export: ours (dense) -> HF directory; recursive: dense -> layer-shared "
        "(+ LoRA); merge: recursive -> the equivalent dense model",
    )
    c.add_argument(
        "src",
        help="source directory, GGUF file, named model (smollm2), or hub name for hf-import",
    )
    c.add_argument("dst", help="destination directory")
    c.add_argument("--force", action="store_true", help="replace an existing destination")
    rg = c.add_argument_group("recursive")
    rg.add_argument(
        "--loops", type=int, default=2, help="recursions B (the shared part's layers / B blocks)"
    )
    rg.add_argument(
        "--sharing",
        default="cycle",
        choices=choices.CONVERSION_SHARING,
        help="sharing scheme",
    )
    rg.add_argument(
        "--init",
        default="stepwise",
        choices=choices.INITS,
        help="initialisation of the shared blocks",
    )
    rg.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="per-step LoRA rank of every target (0: no relaxation)",
    )
    rg.add_argument("--lora-ranks", default=None, help="per-target ranks, e.g. q=64,k=32,down=128")
    rg.add_argument(
        "--lora-norms",
        action="store_true",
        help="relax the norms too: per-step norm weights (exact full-rank relaxation of a "
        "source whose layers have different norms)",
    )
    rg.add_argument(
        "--lora-biases",
        action="store_true",
        help="relax the biases too: per-step biases (models with biases, e.g. Qwen2)",
    )
    rg.add_argument(
        "--lora-init",
        default="svd",
        choices=choices.LORA_INITS,
        help="svd: truncated SVD of the residual; asvd: the same, weighted by the source "
        "layer's inputs on --calibration-data (less output error at equal rank); "
        "sequential: fitted step by step on the converted model's own inputs toward the "
        "source's outputs (also corrects drift between layers); zero: standard init",
    )
    rg.add_argument(
        "--calibration-data",
        default=None,
        help="a prepared corpus (earlyexit prepare) whose training tokens calibrate the asvd "
        "and sequential inits",
    )
    rg.add_argument(
        "--calibration-tokens",
        type=int,
        default=16384,
        help="how many training tokens calibrate asvd / sequential (windows of 256)",
    )
    rg.add_argument("--seed", type=int, default=0, help="seed of random and standard inits")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=run)


def _check_dst(dst: str, force: bool) -> None:
    p = Path(dst)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not force:
        raise InputError(f"{dst}: already exists; pass --force to replace it")


def run(args: argparse.Namespace) -> int:
    import earlyexit
    from earlyexit.chat import chat_files
    from earlyexit.io import hf
    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.io.gguf import gguf_import, is_gguf
    from earlyexit.io.registry import resolve_model

    _check_dst(args.dst, args.force)
    info: dict = {}
    src = resolve_model(args.src)  # a named model: its cached checkpoint
    if args.kind == "gguf-import" or (args.kind == "hf-import" and is_gguf(src)):
        out = gguf_import(src, args.dst)
    elif args.kind == "hf-import":
        out = hf.hf_import(src, args.dst)
    elif args.kind == "hf-export":
        lm = earlyexit.load(src, device="cpu", draft=None)
        out = hf.hf_export(lm.model, args.dst, lm.tokenizer)
    elif args.kind == "recursive":
        from earlyexit.models.recursive import convert_recursive

        lora = _lora_config(args)
        calibration = _calibration(args)
        lm = earlyexit.load(src, device="cpu", draft=None)  # ours, a HF directory, GGUF, or a name
        top = None if calibration is None else int(calibration.max())
        if top is not None and top >= lm.config.vocab_size:
            raise InputError(
                f"{args.calibration_data}: token ids up to {top} do not fit "
                f"{args.src}'s vocabulary of {lm.config.vocab_size} (prepare it with that "
                "model's tokenizer: earlyexit prepare --tokenizer MODEL)"
            )
        model = convert_recursive(
            lm.model,
            args.loops,
            args.sharing,
            args.init,
            lora,
            args.lora_init,
            args.seed,
            calibration,
        )
        out = save_checkpoint(model, args.dst, lm.tokenizer, chat_files(lm.chat_config))
        counts = model.config.param_counts()
        info = {
            "non_embedding_params": counts["non_embedding"],
            "source_non_embedding_params": lm.config.param_counts()["non_embedding"],
        }
    else:  # merge
        from earlyexit.models.recursive import unroll

        lm = earlyexit.load(src, device="cpu", draft=None)
        if lm.config.sharing.scheme == "none":
            raise InputError(f"{args.src} is already dense; nothing to merge")
        out = save_checkpoint(unroll(lm.model), args.dst, lm.tokenizer, chat_files(lm.chat_config))
    if args.json:
        print(json.dumps({"kind": args.kind, "src": str(args.src), "dst": str(out), **info}))
    else:
        print(
            f"wrote {out}"
            + (
                f" ({info['non_embedding_params'] / 1e6:.2f}M non-embedding parameters, source {info['source_non_embedding_params'] / 1e6:.2f}M)"
                if info
                else ""
            )
        )
    return 0


CALIBRATION_WINDOW = 256


def _calibration(args: argparse.Namespace):
    """Calibration tokens (N, 256) of the asvd and sequential inits, from the start of
    --calibration-data's training split; None for the other inits (where
    --calibration-data is refused, not ignored)."""
    from earlyexit.models.recursive import CALIBRATED

    if args.lora_init not in CALIBRATED:
        if args.calibration_data:
            raise InputError("--calibration-data applies to --lora-init asvd or sequential only")
        return None
    if not args.calibration_data:
        raise InputError(
            f"--lora-init {args.lora_init} needs --calibration-data DIR (a prepared corpus)"
        )
    if args.calibration_tokens < CALIBRATION_WINDOW:
        raise InputError(
            f"--calibration-tokens must be >= {CALIBRATION_WINDOW}, got {args.calibration_tokens}"
        )
    import numpy as np
    import torch

    from earlyexit.training.data import token_file

    tokens = token_file(args.calibration_data, "train")
    n = min(args.calibration_tokens, len(tokens)) // CALIBRATION_WINDOW * CALIBRATION_WINDOW
    if n == 0:
        raise InputError(
            f"{args.calibration_data}: fewer than {CALIBRATION_WINDOW} training tokens to calibrate on"
        )
    rows = np.asarray(tokens[:n], dtype=np.int64).reshape(-1, CALIBRATION_WINDOW)
    return torch.from_numpy(rows)


def _lora_config(args: argparse.Namespace):
    from earlyexit.config import LORA_TARGETS, LoraConfig

    per = {}
    for item in filter(None, (args.lora_ranks or "").split(",")):
        name, _, value = item.partition("=")
        if name not in LORA_TARGETS or not value.lstrip("-").isdigit():
            raise InputError(
                f"--lora-ranks expects target=rank pairs for {', '.join(LORA_TARGETS)}, got {item!r}"
            )
        per[name] = int(value)
    if args.lora_rank < 0 or any(v < 0 for v in per.values()):
        raise InputError("LoRA ranks must be >= 0")
    return LoraConfig(rank=args.lora_rank, norms=args.lora_norms, biases=args.lora_biases, **per)
