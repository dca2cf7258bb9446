"""``earlyexit bench``: the benchmarks of BENCHMARKS.md, one at a time or all of them."""

from __future__ import annotations

import argparse
import json
import sys

from earlyexit.cli.common import (
    add_device_flags,
    add_precision_flag,
)
from earlyexit.errors import InputError


def register(sub) -> None:
    """Add ``earlyexit bench`` and its flags to the subcommand parsers ``sub``."""
    b = sub.add_parser("bench", help="run a benchmark (see BENCHMARKS.md)")
    b.add_argument(
        "name",
        choices=[
            "decode",
            "early-exit",
            "batched-exit",
            "conversion",
            "depthwise",
            "serve",
            "mor-isoflop",
            "plot",
            "reliability",
            "all",
        ],
        help="decode: our decoder vs transformers; early-exit: strategies at batch 1; batched-exit: exits under batching; conversion: dense -> recursive; depthwise: batching policies under a request stream; serve: HTTP vs offline; mor-isoflop: vanilla / recursive / MoR at equal FLOPs; plot: figures from the JSON rows",
    )
    b.add_argument("--preset", default="smollm-135m", help="decode: model shape (random init)")
    b.add_argument(
        "--source",
        default=None,
        help="conversion: the dense source checkpoint (default runs/stdlib-small/final)",
    )
    b.add_argument(
        "--steps", type=int, default=None, help="conversion: uptraining steps per variant (120)"
    )
    b.add_argument(
        "--dense", default="runs/stdlib-small/final", help="depthwise: the vanilla dense model"
    )
    b.add_argument(
        "--recursive",
        default="runs/stdlib-small-rec-exit/final",
        help="depthwise: the recursive model (with a loop exit)",
    )
    b.add_argument(
        "--exit-model",
        default=None,
        help="depthwise: a dense model with exits for the naive static baseline",
    )
    b.add_argument("--max-batch", type=int, default=32, help="depthwise/serve: concurrent requests")
    b.add_argument(
        "--mor", default=None, help="depthwise: a Mixture-of-Recursions model to serve too"
    )
    b.add_argument("--clients", type=int, default=64, help="serve: concurrent streaming clients")
    b.add_argument(
        "--model",
        default=None,
        help="early-exit/batched-exit: checkpoint with trained exits; decode: a real model "
        "instead of --preset's random weights",
    )
    b.add_argument(
        "--calm-model", default=None, help="early-exit: a second checkpoint (CALM-trained exits)"
    )
    b.add_argument(
        "--data",
        default="data/stdlib",
        help="prepared data: prompts come from its validation split",
    )
    b.add_argument("--prompts", type=int, default=None, help="number of validation prompts")
    b.add_argument(
        "--threshold",
        type=float,
        default=0.3,
        help="batched-exit: exit threshold of naive and ours",
    )
    b.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes to run (depthwise: max batches, one group of rows each)",
    )
    b.add_argument(
        "--draft-vocab",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="early-exit: add self-speculation drafting over the N most frequent tokens of "
        "--data's training split (FR-Spec)",
    )
    b.add_argument(
        "--exit-vocab",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="early-exit/batched-exit: add FREE with a pruned exit head over the N most "
        "frequent tokens of --data's training split; depthwise --synthetic: add loop exits "
        "deciding over N tokens",
    )
    b.add_argument(
        "--deep-kv",
        nargs="+",
        default=None,
        choices=["catch-up", "propagate", "skip"],
        help="depthwise: what the loop exit's exited tokens leave in loop 2, one set of rows "
        "each (default catch-up)",
    )
    b.add_argument(
        "--exit-rates",
        type=float,
        nargs="+",
        default=None,
        help="depthwise --synthetic: shares of tokens exiting after loop 1 (default 0 .25 .5 .75)",
    )
    b.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt")
    b.add_argument("--prompt-len", type=int, default=None, help="prompt tokens per row")
    b.add_argument(
        "--repeats", type=int, default=None, help="interleaved repetitions (median reported)"
    )
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    b.add_argument(
        "--out", default=None, help="JSON rows are written here (default: results/NAME.json)"
    )
    b.add_argument("--results", default="results", help="plot: folder of JSON rows")
    b.add_argument("--plots", default="results/plots", help="plot: output folder")
    b.add_argument("--json", action="store_true", help="print the rows as JSON")
    b.add_argument("--skip", default="", help="all: comma-separated steps to leave out")
    b.add_argument("--dry-run", action="store_true", help="all: print the commands only")
    b.add_argument(
        "--calls",
        action="store_true",
        help="depthwise: time one shared-block call with rows at mixed loops vs one loop "
        "(--preset shape, --batch-sizes rows, --lengths contexts)",
    )
    b.add_argument(
        "--lengths", type=int, nargs="+", default=None, help="depthwise --calls: context lengths"
    )
    b.add_argument(
        "--synthetic",
        action="store_true",
        help="depthwise: random-weight models of --presets shapes, exits and MoR depths drawn "
        "from fixed distributions (a systems measurement, not a quality one); --batch-sizes "
        "max batches, --prompts requests, --new-tokens mean generation length",
    )
    b.add_argument("--presets", nargs="+", default=None, help="depthwise --synthetic: model shapes")
    b.add_argument(
        "--compile",
        action="store_true",
        help="decode: add our static-shape decode step under torch.compile (CUDA graphs on CUDA)",
    )
    add_precision_flag(b, "conversion/mor-isoflop: compute of the trainings they run")
    add_device_flags(b)
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = args.out or f"results/{args.name.replace('-', '_')}.json"
    if args.name not in ("plot", "all"):
        from earlyexit.bench.common import use_device

        use_device(args.device, args.dtype)
    if args.name == "decode":
        from earlyexit.bench.decode import main as decode_main

        decode_main(
            preset=args.preset,
            batch_sizes=args.batch_sizes or [1, 8],
            new_tokens=args.new_tokens or 128,
            prompt_len=args.prompt_len or 16,
            repeats=args.repeats or 3,
            threads=args.threads,
            out=out,
            as_json=args.json,
            device=args.device,
            dtype=args.dtype,
            compile=args.compile,
            model=args.model,
        )
        return 0
    if args.name == "reliability":
        from earlyexit.bench.reliability import run as reliability_run

        fig = reliability_run(n_requests=args.prompts or 1000, clients=args.clients, out=out)
        print(json.dumps({k: v for k, v in fig.items() if k != "env"}, indent=1))
        return 0 if fig["failures"] == 0 else 1
    if args.name == "all":
        from earlyexit.bench.suite import run_all

        skip = {x.strip() for x in args.skip.split(",") if x.strip()}
        device = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
        failed = run_all(args.cli_main, skip, args.dry_run, device=device, precision=args.precision)
        return 1 if failed else 0
    if args.name == "plot":
        from earlyexit.bench.plots import plot_all

        for path in plot_all(args.results, args.plots):
            print(f"wrote {path}")
        return 0
    if args.name == "depthwise" and args.synthetic:
        from earlyexit.bench.depthwise import run_synthetic

        run_synthetic(
            presets=tuple(args.presets or ("stdlib-small", "smollm-135m")),
            max_batches=tuple(args.batch_sizes or (8, 16, 32)),
            n_requests=args.prompts or 64,
            mean_len=args.new_tokens or 32,
            threads=args.threads,
            out=args.out or "results/depthwise_synthetic.json",
            repeats=args.repeats or 1,
            exit_vocab=(args.exit_vocab or [None])[0],
            deep_kvs=tuple(args.deep_kv or ("catch-up",)),
            **({"exit_rates": tuple(args.exit_rates)} if args.exit_rates else {}),
        )
        return 0
    if args.name == "depthwise" and args.calls:
        from earlyexit.bench.block_call import run as calls_run
        from earlyexit.bench.common import bench_device

        calls_run(
            preset=args.preset,
            rows=tuple(args.batch_sizes or (4, 16, 32)),
            lengths=tuple(args.lengths or (128, 512, 2048)),
            repeats=args.repeats or 20,
            threads=args.threads,
            device=bench_device(),
            out=args.out or "results/depthwise_calls.json",
        )
        return 0
    if args.name == "depthwise":
        from earlyexit.bench.depthwise import run as depthwise_run

        rows = depthwise_run(
            mor=args.mor,
            dense=args.dense,
            recursive=args.recursive,
            data=args.data,
            exit_model=args.exit_model,
            threshold=args.threshold,
            n_requests=args.prompts or 256,
            deep_kvs=tuple(args.deep_kv or ("catch-up",)),
            max_batch=tuple(args.batch_sizes) if args.batch_sizes else args.max_batch,
            threads=args.threads,
            out=out,
            mean_len=args.new_tokens or 128,
            repeats=args.repeats or 1,
            exit_vocab=(args.exit_vocab or [None])[0],
        )
        if args.json:
            print(json.dumps(rows))
        return 0
    if args.name == "serve":
        from earlyexit.bench.serve_load import run as serve_run

        rows = serve_run(
            args.model or "runs/stdlib-small-rec-exit/final",
            args.data,
            args.clients,
            args.prompts or 256,
            threshold=args.threshold,
            max_batch=args.max_batch,
            threads=args.threads,
            out=out,
        )
        if args.json:
            print(json.dumps(rows))
        return 0
    if args.name == "mor-isoflop":
        from earlyexit.bench.isoflop import run as isoflop_run

        rows = isoflop_run(args.data, args.threads, out, precision=args.precision)
        if args.json:
            print(json.dumps(rows))
        return 0
    if args.name == "conversion":
        from earlyexit.bench.conversion import run as conversion_run

        rows = conversion_run(
            args.source or "runs/stdlib-small/final",
            args.data,
            steps=args.steps or 120,
            threads=args.threads,
            out=out,
            precision=args.precision,
        )
        if args.json:
            print(json.dumps(rows))
        return 0
    from earlyexit.bench.early_exit import main_batched_exit, main_early_exit

    if args.model is None:
        raise InputError(f"bench {args.name} needs --model (a checkpoint with trained exits)")
    if args.name == "early-exit":
        rows = main_early_exit(
            args.model,
            args.data,
            args.calm_model,
            args.prompts or 16,
            args.prompt_len or 32,
            args.new_tokens or 64,
            args.repeats or 2,
            args.threads,
            out,
            draft_vocabs=tuple(args.draft_vocab or ()),
            exit_vocabs=tuple(args.exit_vocab or ()),
        )
    else:
        rows = main_batched_exit(
            args.model,
            args.data,
            tuple(args.batch_sizes or (1, 8, 16, 32)),
            args.threshold,
            args.prompts or 32,
            args.prompt_len or 32,
            args.new_tokens or 64,
            args.repeats or 2,
            args.threads,
            out,
            exit_vocab=(args.exit_vocab or [None])[0],
        )
    if args.json:
        print(json.dumps(rows))
    print(f"rows written to {out}", file=sys.stderr)
    return 0
