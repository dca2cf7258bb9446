"""``earlyexit train``: train or fine-tune from a recipe, a config file and flags."""

from __future__ import annotations

import argparse
import json
import os
import sys

from earlyexit.cli.common import add_dataclass_flags
from earlyexit.errors import InputError
from earlyexit.training.config import TrainConfig, check_choice

# Every TrainConfig field is a flag (cli/common.py's add_dataclass_flags: type, default, help
# and choices from the dataclass); here only how --help groups them, and a few extras.
GROUPS = [
    ("run", "data out model init_from objective device threads fsdp seed"),
    (
        "optimisation",
        "steps flops_budget seq_len batch_size grad_accum lr min_lr_ratio schedule "
        "warmup_steps decay_fraction weight_decay beta1 beta2 grad_clip precision nonfinite "
        "doc_mask train_only",
    ),
    (
        "early exits (--objective exits | exit-classifier)",
        "exit_steps exit_loss exit_coef kd_alpha exit_norms exit_classifier exit_adapter_rank",
    ),
    ("recursive uptraining (--objective uptrain)", "teacher distill_weight"),
    (
        "logging and checkpoints",
        "eval_every eval_batches save_every keep_last log_every stop_at_step",
    ),
]
EXTRAS = {
    "precision": {"aliases": ["--dtype"]},
    "train_only": {"metavar": "PREFIX"},
    "exit_steps": {"metavar": "STEP"},
}


def register(sub) -> None:
    """Add ``earlyexit train`` and its flags to the subcommand parsers ``sub``."""
    t = sub.add_parser(
        "train",
        help="train or fine-tune a model (also under torchrun)",
        description="Train or fine-tune a model. A run is a TrainConfig: a recipe (--preset) "
        "or a file (--config), then the flags given on top; each field of TrainConfig is a "
        "flag below, its default TrainConfig's where neither sets it.",
    )
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
    add_dataclass_flags(t, TrainConfig, GROUPS, EXTRAS, check=check_choice)
    t.set_defaults(func=run)


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig a ``train`` command line describes: recipe or file, then flags."""
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
