"""``earlyexit bench NAME``: the benchmarks of BENCHMARKS.md, one subcommand each.

Each benchmark declares only the flags it reads, with their defaults at the flag
(``earlyexit bench depthwise --help`` lists what depthwise takes); its handler passes them to
one function of ``earlyexit.bench``. ``bench all`` runs the suite (``bench/suite.py``), each
step the command line a user would type.
"""

from __future__ import annotations

import argparse
import json
import sys

from earlyexit.cli import choices
from earlyexit.cli.common import DefaultsFormatter, add_device_flags, add_precision_flag

DATA = "data/stdlib"
DENSE = "runs/stdlib-small/final"
RECURSIVE_EXIT = "runs/stdlib-small-rec-exit/final"


def _given(**kwargs) -> dict:
    """The keyword arguments whose flag was given (not None): the others keep the benchmark
    function's own default (depthwise's modes differ in theirs)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _common(p, out: str | None, out_help: str = "JSON rows are written here") -> None:
    """--threads, --out and --json, which every measuring benchmark takes."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default=out, help=out_help)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def _data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default=DATA, help="prepared data: prompts come from its validation split"
    )


def _lengths(p: argparse.ArgumentParser, prompts: int, prompt_len: int, new_tokens: int) -> None:
    p.add_argument("--prompts", type=int, default=prompts, help="number of validation prompts")
    p.add_argument("--prompt-len", type=int, default=prompt_len, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=new_tokens, help="tokens generated per prompt")


def _repeats(p: argparse.ArgumentParser, default: int | None, help_default: str = "") -> None:
    p.add_argument(
        "--repeats",
        type=int,
        default=default,
        help=f"interleaved repetitions (median reported){help_default}",
    )


def _threshold(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--threshold", type=float, default=0.3, help=f"exit threshold of {what}")


def _print_rows(args: argparse.Namespace, rows) -> None:
    if args.json:
        print(json.dumps(rows))


def _use_device(args: argparse.Namespace) -> None:
    from earlyexit.bench.common import use_device

    use_device(args.device, args.dtype)


# --- decode


def _decode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="smollm-135m", help="model shape (random init)")
    p.add_argument(
        "--model", default=None, help="a real model instead of --preset's random weights"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to run")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row")
    _repeats(p, 3)
    p.add_argument(
        "--compile",
        action="store_true",
        help="add our static-shape decode step under torch.compile (CUDA graphs on CUDA)",
    )
    _common(p, "results/decode.json")
    add_device_flags(p)


def _decode(args: argparse.Namespace) -> int:
    from earlyexit.bench.decode import main

    _use_device(args)
    main(
        preset=args.preset,
        batch_sizes=args.batch_sizes,
        new_tokens=args.new_tokens,
        prompt_len=args.prompt_len,
        repeats=args.repeats,
        threads=args.threads,
        out=args.out,
        as_json=args.json,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        model=args.model,
    )
    return 0


# --- early-exit, batched-exit


def _early_exit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint with trained exits")
    p.add_argument("--calm-model", default=None, help="a second checkpoint (CALM-trained exits)")
    _data(p)
    _lengths(p, prompts=16, prompt_len=32, new_tokens=64)
    _repeats(p, 2)
    p.add_argument(
        "--draft-vocab",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="add self-speculation drafting over the N most frequent tokens of --data's "
        "training split (FR-Spec)",
    )
    p.add_argument(
        "--exit-vocab",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="add FREE with a pruned exit head over the N most frequent tokens of --data's "
        "training split",
    )
    _common(p, "results/early_exit.json")
    add_device_flags(p)


def _early_exit(args: argparse.Namespace) -> int:
    from earlyexit.bench.early_exit import main_early_exit

    _use_device(args)
    rows = main_early_exit(
        args.model,
        args.data,
        args.calm_model,
        args.prompts,
        args.prompt_len,
        args.new_tokens,
        args.repeats,
        args.threads,
        args.out,
        draft_vocabs=tuple(args.draft_vocab),
        exit_vocabs=tuple(args.exit_vocab),
    )
    _print_rows(args, rows)
    print(f"rows written to {args.out}", file=sys.stderr)
    return 0


def _batched_exit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint with trained exits")
    _data(p)
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32], help="batch sizes to run"
    )
    _threshold(p, "naive and ours")
    _lengths(p, prompts=32, prompt_len=32, new_tokens=64)
    _repeats(p, 2)
    p.add_argument(
        "--exit-vocab",
        type=int,
        default=None,
        metavar="N",
        help="add FREE with a pruned exit head over the N most frequent tokens of --data's "
        "training split",
    )
    _common(p, "results/batched_exit.json")
    add_device_flags(p)


def _batched_exit(args: argparse.Namespace) -> int:
    from earlyexit.bench.early_exit import main_batched_exit

    _use_device(args)
    rows = main_batched_exit(
        args.model,
        args.data,
        tuple(args.batch_sizes),
        args.threshold,
        args.prompts,
        args.prompt_len,
        args.new_tokens,
        args.repeats,
        args.threads,
        args.out,
        exit_vocab=args.exit_vocab,
    )
    _print_rows(args, rows)
    print(f"rows written to {args.out}", file=sys.stderr)
    return 0


# --- conversion, mor-isoflop


def _conversion_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=DENSE, help="the dense source checkpoint")
    _data(p)
    p.add_argument("--steps", type=int, default=120, help="uptraining steps per variant")
    add_precision_flag(p, "compute of the uptrainings")
    _common(p, "results/conversion.json")
    add_device_flags(p)


def _conversion(args: argparse.Namespace) -> int:
    from earlyexit.bench.conversion import run

    _use_device(args)
    rows = run(
        args.source,
        args.data,
        steps=args.steps,
        threads=args.threads,
        out=args.out,
        precision=args.precision,
    )
    _print_rows(args, rows)
    return 0


def _isoflop_flags(p: argparse.ArgumentParser) -> None:
    _data(p)
    add_precision_flag(p, "compute of the trainings it runs")
    _common(p, "results/mor_isoflop.json")
    add_device_flags(p)


def _isoflop(args: argparse.Namespace) -> int:
    from earlyexit.bench.isoflop import run

    _use_device(args)
    _print_rows(args, run(args.data, args.threads, args.out, precision=args.precision))
    return 0


# --- depthwise (trained models; --synthetic: random weights; --calls: one block call)


def _depthwise_flags(p: argparse.ArgumentParser) -> None:
    mode = p.add_argument_group("mode (default: the trained models below)")
    mode.add_argument(
        "--synthetic",
        action="store_true",
        help="random-weight models of --presets shapes, exits and MoR depths drawn from fixed "
        "distributions (a systems measurement, not a quality one); --batch-sizes max batches, "
        "--prompts requests, --new-tokens mean generation length",
    )
    mode.add_argument(
        "--calls",
        action="store_true",
        help="time one shared-block call with rows at mixed loops vs one loop (--preset "
        "shape, --batch-sizes rows, --lengths contexts)",
    )
    t = p.add_argument_group("trained models")
    t.add_argument("--dense", default=DENSE, help="the vanilla dense model")
    t.add_argument(
        "--recursive", default=RECURSIVE_EXIT, help="the recursive model (with a loop exit)"
    )
    t.add_argument(
        "--exit-model", default=None, help="a dense model with exits for the naive static baseline"
    )
    t.add_argument("--mor", default=None, help="a Mixture-of-Recursions model to serve too")
    _data(t)
    _threshold(t, "the exits")
    t.add_argument(
        "--max-batch", type=int, default=32, help="concurrent requests (unless --batch-sizes)"
    )
    s = p.add_argument_group("--synthetic")
    s.add_argument(
        "--presets",
        nargs="+",
        default=["stdlib-small", "smollm-135m"],
        help="model shapes",
    )
    s.add_argument(
        "--exit-rates",
        type=float,
        nargs="+",
        default=None,
        help="shares of tokens exiting after loop 1 (default: 0 0.25 0.5 0.75)",
    )
    c = p.add_argument_group("--calls")
    c.add_argument("--preset", default="smollm-135m", help="model shape")
    c.add_argument(
        "--lengths", type=int, nargs="+", default=[128, 512, 2048], help="context lengths"
    )
    g = p.add_argument_group("all modes")
    g.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="max batches, one group of rows each (default: --max-batch; --synthetic: 8 16 32; "
        "--calls: rows per call, 4 16 32)",
    )
    g.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="requests (default: 256; --synthetic: 64)",
    )
    g.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="mean generation length (default: 128; --synthetic: 32)",
    )
    g.add_argument(
        "--deep-kv",
        nargs="+",
        default=["catch-up"],
        choices=choices.DEEP_KV,
        help="what the loop exit's exited tokens leave in loop 2, one set of rows each",
    )
    g.add_argument(
        "--exit-vocab",
        type=int,
        default=None,
        metavar="N",
        help="the loop exit decides over the N most frequent tokens (trained: of --data's "
        "training split)",
    )
    _repeats(g, None, " (default: 1; --calls: 20)")
    _common(
        g,
        None,
        "JSON rows are written here (default: results/depthwise.json; --synthetic: "
        "results/depthwise_synthetic.json; --calls: results/depthwise_calls.json)",
    )
    add_device_flags(p)


def _depthwise(args: argparse.Namespace) -> int:
    _use_device(args)
    if args.synthetic:
        from earlyexit.bench.depthwise import run_synthetic

        rows = run_synthetic(
            presets=tuple(args.presets),
            threads=args.threads,
            exit_vocab=args.exit_vocab,
            deep_kvs=tuple(args.deep_kv),
            **_given(
                max_batches=args.batch_sizes and tuple(args.batch_sizes),
                n_requests=args.prompts,
                mean_len=args.new_tokens,
                out=args.out,
                repeats=args.repeats,
                exit_rates=args.exit_rates and tuple(args.exit_rates),
            ),
        )
        _print_rows(args, rows)
        return 0
    if args.calls:
        from earlyexit.bench.block_call import run as calls_run
        from earlyexit.bench.common import bench_device

        rows = calls_run(
            preset=args.preset,
            lengths=tuple(args.lengths),
            threads=args.threads,
            device=bench_device(),
            **_given(
                rows=args.batch_sizes and tuple(args.batch_sizes),
                repeats=args.repeats,
                out=args.out,
            ),
        )
        _print_rows(args, rows)
        return 0
    from earlyexit.bench.depthwise import run

    rows = run(
        mor=args.mor,
        dense=args.dense,
        recursive=args.recursive,
        data=args.data,
        exit_model=args.exit_model,
        threshold=args.threshold,
        deep_kvs=tuple(args.deep_kv),
        max_batch=tuple(args.batch_sizes) if args.batch_sizes else args.max_batch,
        threads=args.threads,
        exit_vocab=args.exit_vocab,
        **_given(
            n_requests=args.prompts,
            out=args.out,
            mean_len=args.new_tokens,
            repeats=args.repeats,
        ),
    )
    _print_rows(args, rows)
    return 0


# --- serve


def _serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=RECURSIVE_EXIT, help="the model served")
    _data(p)
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    p.add_argument("--prompts", type=int, default=256, help="requests")
    _threshold(p, "the served exits")
    p.add_argument("--max-batch", type=int, default=32, help="concurrent requests")
    _common(p, "results/serve.json")
    add_device_flags(p)


def _serve(args: argparse.Namespace) -> int:
    from earlyexit.bench.serve_load import run

    _use_device(args)
    rows = run(
        args.model,
        args.data,
        args.clients,
        args.prompts,
        threshold=args.threshold,
        max_batch=args.max_batch,
        threads=args.threads,
        out=args.out,
    )
    _print_rows(args, rows)
    return 0


# --- plot, all


def _plot_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", help="folder of JSON rows")
    p.add_argument("--plots", default="results/plots", help="output folder")


def _plot(args: argparse.Namespace) -> int:
    from earlyexit.bench.plots import plot_all

    for path in plot_all(args.results, args.plots):
        print(f"wrote {path}")
    return 0


def _all_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip", default="", help="comma-separated steps to leave out")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    add_precision_flag(p, "compute of the trainings (recipes and conversion/mor-isoflop)")
    add_device_flags(p)


def _all(args: argparse.Namespace) -> int:
    from earlyexit.bench.suite import run_all

    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    device = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    failed = run_all(args.cli_main, skip, args.dry_run, device=device, precision=args.precision)
    return 1 if failed else 0


# name -> (help, flags, handler), in the order of BENCHMARKS.md
BENCHMARKS = {
    "decode": ("our decoder vs transformers", _decode_flags, _decode),
    "early-exit": ("strategies at batch 1", _early_exit_flags, _early_exit),
    "batched-exit": ("exits under batching", _batched_exit_flags, _batched_exit),
    "conversion": ("dense -> recursive", _conversion_flags, _conversion),
    "depthwise": (
        "batching policies under a request stream",
        _depthwise_flags,
        _depthwise,
    ),
    "serve": ("HTTP vs offline", _serve_flags, _serve),
    "mor-isoflop": ("vanilla / recursive / MoR at equal FLOPs", _isoflop_flags, _isoflop),
    "plot": ("figures from the JSON rows", _plot_flags, _plot),
    "all": ("the whole suite: missing training, every benchmark, the figures", _all_flags, _all),
}


def register(sub) -> None:
    """Add ``earlyexit bench NAME`` for every benchmark of :data:`BENCHMARKS`."""
    b = sub.add_parser(
        "bench",
        help="run a benchmark (see BENCHMARKS.md)",
        description="Run one benchmark of BENCHMARKS.md (or all of them); each writes JSON "
        "rows under results/. `earlyexit bench NAME --help` lists NAME's flags.",
    )
    names = b.add_subparsers(dest="name", required=True, metavar="BENCHMARK")
    for name, (text, flags, handler) in BENCHMARKS.items():
        p = names.add_parser(name, help=text, description=text, formatter_class=DefaultsFormatter)
        flags(p)
        p.set_defaults(func=handler)
