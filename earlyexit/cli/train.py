"""``earlyexit train``: train or fine-tune from a recipe, a config file and flags."""

from __future__ import annotations

import argparse
import json
import os
import sys

from earlyexit.errors import InputError


def register(sub) -> None:
    """Add ``earlyexit train`` and its flags to the subcommand parsers ``sub``."""
    t = sub.add_parser("train", help="train or fine-tune a model (also under torchrun)")
    t.add_argument(
        "--preset",
        default=None,
        help="a named recipe, earlyexit/recipes/NAME.json (stdlib-small; --list-presets)",
    )
    t.add_argument(
        "--config",
        default=None,
        help="a TrainConfig JSON file, the format of a recipe (flags override it)",
    )
    t.add_argument(
        "--list-presets",
        action="store_true",
        help="list the recipes (--preset NAME), one line each, and the model presets "
        "(--model NAME); then exit",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    tg = t.add_argument_group("run")
    tg.add_argument("--data", help="prepared data directory")
    tg.add_argument("--out", help="run directory")
    tg.add_argument("--model", help="model preset or ModelConfig JSON (from scratch)")
    tg.add_argument("--init-from", dest="init_from", help="checkpoint to fine-tune instead")
    tg.add_argument("--objective", help="training objective (lm)")
    tg.add_argument("--device", help="cpu, cuda or auto")
    tg.add_argument("--threads", type=int, help="torch CPU threads (0: default)")
    tg.add_argument(
        "--fsdp", action="store_true", default=None, help="shard with FSDP2 under torchrun"
    )
    tg.add_argument("--seed", type=int, help="seed of initialisation and data order")
    og = t.add_argument_group("optimisation")
    og.add_argument("--steps", type=int, help="optimizer steps")
    og.add_argument(
        "--flops-budget",
        dest="flops_budget",
        type=float,
        help="set the steps from a forward-FLOP budget (MoR's accountant)",
    )
    og.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per window")
    og.add_argument(
        "--batch-size", dest="batch_size", type=int, help="windows per micro-batch per process"
    )
    og.add_argument("--grad-accum", dest="grad_accum", type=int, help="micro-batches per step")
    og.add_argument("--lr", type=float, help="peak learning rate")
    og.add_argument("--min-lr-ratio", dest="min_lr_ratio", type=float, help="final lr / peak lr")
    og.add_argument("--schedule", choices=["cosine", "wsd"], help="lr schedule")
    og.add_argument("--warmup-steps", dest="warmup_steps", type=int, help="linear warmup steps")
    og.add_argument(
        "--decay-fraction",
        dest="decay_fraction",
        type=float,
        help="wsd: fraction of steps decaying",
    )
    og.add_argument(
        "--weight-decay", dest="weight_decay", type=float, help="AdamW weight decay (matrices only)"
    )
    og.add_argument(
        "--grad-clip", dest="grad_clip", type=float, help="max gradient norm; <= 0 disables"
    )
    og.add_argument(
        "--precision",
        "--dtype",
        dest="precision",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="training compute: auto (default) = bfloat16 autocast where the hardware runs "
        "bf16 natively (AVX512-BF16/AMX CPUs, bf16 GPUs), float32 elsewhere; bfloat16 keeps "
        "fp32 master weights; float16 is refused",
    )
    og.add_argument("--nonfinite", choices=["stop", "skip"], help="what a NaN/inf loss does")
    og.add_argument(
        "--doc-mask",
        dest="doc_mask",
        action="store_true",
        default=None,
        help="attend only within each document of a packed window",
    )
    xg = t.add_argument_group("early exits (--objective exits | exit-classifier)")
    xg.add_argument(
        "--exit-steps",
        dest="exit_steps",
        type=int,
        nargs="+",
        help="exit after these many steps (e.g. 2, or 2 4 6)",
    )
    xg.add_argument(
        "--exit-loss",
        dest="exit_loss",
        choices=["weighted", "aggressive", "shallow-deep"],
        help="weighted: CALM; aggressive: RRT (0.1 + KD); shallow-deep: FREE (default)",
    )
    xg.add_argument(
        "--exit-coef",
        dest="exit_coef",
        type=float,
        help="aggressive: weight of intermediate exits (0.1)",
    )
    xg.add_argument(
        "--kd-alpha",
        dest="kd_alpha",
        type=float,
        help="shallow-deep: weight of layer-wise distillation (0.5)",
    )
    xg.add_argument(
        "--exit-norms",
        dest="exit_norms",
        action="store_true",
        default=None,
        help="a small RMSNorm per intermediate exit",
    )
    xg.add_argument(
        "--exit-classifier",
        dest="exit_classifier",
        action="store_true",
        default=None,
        help="add a learned confidence classifier per exit",
    )
    xg.add_argument(
        "--exit-adapter-rank",
        dest="exit_adapter_rank",
        type=int,
        help="a residual adapter of this rank per intermediate exit (0: none)",
    )
    og.add_argument(
        "--train-only",
        dest="train_only",
        nargs="+",
        metavar="PREFIX",
        help="train only parameters whose names start with these prefixes (e.g. exit_); "
        "freeze the rest",
    )
    ug = t.add_argument_group("recursive uptraining (--objective uptrain)")
    ug.add_argument("--teacher", help="the dense source model distilled from")
    ug.add_argument(
        "--distill-weight",
        dest="distill_weight",
        type=float,
        help="weight of KL(teacher || student) (1.0)",
    )
    lg = t.add_argument_group("logging and checkpoints")
    lg.add_argument(
        "--eval-every",
        dest="eval_every",
        type=int,
        help="steps between validations; <= 0: at the end only",
    )
    lg.add_argument("--eval-batches", dest="eval_batches", type=int, help="validation batches")
    lg.add_argument(
        "--save-every",
        dest="save_every",
        type=int,
        help="steps between checkpoints; <= 0: at the end only",
    )
    lg.add_argument(
        "--keep-last", dest="keep_last", type=int, help="checkpoints kept; <= 0 keeps all"
    )
    lg.add_argument("--log-every", dest="log_every", type=int, help="steps between metric lines")
    lg.add_argument(
        "--stop-at-step",
        dest="stop_at_step",
        type=int,
        help="end the process after this step as if interrupted (-1: never)",
    )
    t.set_defaults(func=run)


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig a ``train`` command line describes: recipe or file, then flags."""
    from earlyexit.training.config import TrainConfig
    from earlyexit.training.recipes import RECIPES

    flags = {
        k: v
        for k, v in vars(args).items()
        if k in TrainConfig.__dataclass_fields__ and v is not None
    }
    if args.config and args.preset:
        raise InputError(
            "--preset and --config both name a whole recipe; give one (copy the preset's file "
            "from earlyexit/recipes/ to change it)"
        )
    if args.config:
        return TrainConfig.from_file(args.config, **flags).validate()
    base = {}
    if args.preset:
        if args.preset not in RECIPES:
            raise InputError(
                f"unknown training preset {args.preset!r}; presets: {', '.join(RECIPES)}"
            )
        base = RECIPES[args.preset]
    return TrainConfig(**{**base, **flags}).validate()


def _list_presets(as_json: bool) -> int:
    from earlyexit.config import PRESETS
    from earlyexit.training.recipes import DESCRIPTIONS, list_recipes

    if as_json:
        print(json.dumps({"recipes": DESCRIPTIONS, "model_presets": sorted(PRESETS)}))
        return 0
    print("\n".join(list_recipes()))
    print(f"model presets (--model NAME): {', '.join(sorted(PRESETS))}")
    return 0


def run(args: argparse.Namespace) -> int:
    from earlyexit.training.loop import train

    if args.list_presets:
        return _list_presets(args.json)
    cfg = train_config_from_args(args)
    summary = train(
        cfg,
        resume=args.resume,
        progress=not args.no_progress and not args.json,
        log=(lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr)),
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    if args.json:
        print(json.dumps(summary))
    elif summary["finished"] and summary["val_nll"] is not None:
        mfu = f", MFU {summary['mfu']:.1%}" if summary["mfu"] else ""
        print(
            f"done: {summary['steps']} steps, val nll {summary['val_nll']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tokens/s{mfu}; model in {summary['final']}",
            file=sys.stderr,
        )
    return 0
