"""``earlyexit eval``: perplexity, agreement with full depth, lm-evaluation-harness tasks."""

from __future__ import annotations

import argparse
import json

from earlyexit.cli import choices
from earlyexit.cli.common import (
    add_device_flags,
    add_strategy_flags,
    draft_arg,
    strategy_options,
)
from earlyexit.errors import InputError


def register(sub) -> None:
    """Add ``earlyexit eval`` and its flags to the subcommand parsers ``sub``."""
    e = sub.add_parser("eval", help="evaluate a model")
    e.add_argument(
        "kind",
        choices=["perplexity", "agreement", "lm-eval"],
        help="perplexity: validation NLL of a prepared corpus; agreement: a strategy's output "
        "vs full depth (token match, ROUGE-L, speedup); lm-eval: lm-evaluation-harness tasks",
    )
    e.add_argument(
        "--model",
        required=True,
        help="checkpoint, Hugging Face directory, GGUF file or named model (smollm2)",
    )
    e.add_argument("--data", default=None, help="prepared data directory (perplexity, agreement)")
    e.add_argument("--split", default="val", choices=["val", "train"], help="which split")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    e.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    e.add_argument(
        "--max-batches", type=int, default=-1, help="stop after this many batches (-1: all)"
    )
    e.add_argument(
        "--routing",
        default="causal",
        choices=choices.ROUTINGS,
        help="MoR models: causal (default) or the training top-k rule (not causal; for comparison only)",
    )
    ag = e.add_argument_group("agreement")
    ag.add_argument("--prompts", type=int, default=16, help="validation prompts")
    ag.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    ag.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    lg2 = e.add_argument_group("lm-eval")
    lg2.add_argument("--tasks", default=None, help="comma-separated lm-eval task names")
    lg2.add_argument("--include-path", default=None, help="folder of local task YAML files")
    lg2.add_argument("--limit", type=float, default=None, help="documents per task (or fraction)")
    lg2.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples")
    add_strategy_flags(e)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    add_device_flags(e)
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.kind == "lm-eval":
        return _eval_lm_eval(args)
    if not args.data:
        raise InputError(f"eval {args.kind} needs --data DIR (a prepared corpus)")
    if args.kind == "agreement":
        from earlyexit.evaluation.agreement import agreement_eval

        res = agreement_eval(
            args.model,
            args.data,
            args.strategy,
            strategy_options(args) if args.strategy != "full" else {"compile": args.compile},
            n_prompts=args.prompts,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            device=args.device,
            dtype=args.dtype,
            draft=draft_arg(args),
        )
        if args.json:
            print(json.dumps(res))
        else:
            print(
                f"{res['strategy']}: token match {res['token_match']:.3f}  ROUGE-L {res['rouge_l']:.3f}  "
                f"speedup {res['speedup']:.2f}x  mean depth {res['mean_depth']:.2f}/{res['n_steps']}  "
                f"exit rate {res['exit_rate']:.0%}"
            )
        return 0
    from earlyexit.evaluation.perplexity import perplexity

    res = perplexity(
        args.model,
        args.data,
        routing=args.routing,
        split=args.split,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=args.device,
        dtype=args.dtype,
    )
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{args.split} NLL {res['nll']:.4f}  perplexity {res['perplexity']:.3f}  "
            f"({res['tokens']:,} tokens, {res['tokens_per_s']:,.0f} tokens/s)"
        )
    return 0


def _eval_lm_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval
    except ImportError:
        raise InputError("eval lm-eval needs lm-eval: pip install 'earlyexit[eval]'") from None
    from lm_eval.tasks import TaskManager

    from earlyexit.evaluation.lm_eval_adapter import EarlyExitLM

    if not args.tasks:
        raise InputError("eval lm-eval needs --tasks NAME[,NAME...]")
    opts = {k: v for k, v in strategy_options(args).items() if v is not None}
    if args.strategy == "full":
        opts = {}
    lm = EarlyExitLM(args.model, args.strategy, device=args.device, dtype=args.dtype, **opts)
    tm = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[t for t in args.tasks.split(",") if t],
        task_manager=tm,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
    )
    depths = lm.depths
    out = {
        "model": args.model,
        "strategy": args.strategy,
        "options": opts,
        "results": res["results"],
        "mean_depth": sum(depths) / max(len(depths), 1),
        "n_steps": lm.lm.model.n_steps,
    }
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for task, metrics in res["results"].items():
            shown = ", ".join(
                f"{k} {v:.4f}"
                for k, v in metrics.items()
                if isinstance(v, float) and "stderr" not in k
            )
            print(f"{task}: {shown}")
        print(f"[{args.strategy}: mean depth {out['mean_depth']:.2f}/{out['n_steps']}]")
    return 0
