"""``earlyexit serve``: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import sys

from earlyexit.cli import choices
from earlyexit.cli.common import (
    DefaultsFormatter,
    add_device_flags,
    frequent_vocab,
    number_or_adaptive,
)
from earlyexit.errors import InputError


def register(sub) -> None:
    """Add ``earlyexit serve`` and its flags to the subcommand parsers ``sub``."""
    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (FastAPI + uvicorn)",
        formatter_class=DefaultsFormatter,
    )
    sv.add_argument(
        "--model",
        required=True,
        help="earlyexit checkpoint, Hugging Face directory, GGUF file, or a named model (smollm2)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="bind address (loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    sv.add_argument(
        "--name",
        default=None,
        help="model id clients use (default: the run's name for RUN/final, else the "
        "directory name)",
    )
    sv.add_argument(
        "--policy",
        default="depthwise",
        choices=choices.POLICIES,
        help="batching policy",
    )
    sv.add_argument("--max-batch", type=int, default=32, help="concurrent requests")
    sv.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="prompt + generated tokens per request (default: the model's context)",
    )
    sv.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="waiting requests beyond which the server answers 503",
    )
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    sv.add_argument(
        "--strategy",
        default=None,
        choices=choices.SERVED_STRATEGIES,
        help="default strategy of requests that name none (each request may choose its own; "
        "default: full, or free when an exit option below is given)",
    )
    sv.add_argument(
        "--exit-step",
        type=int,
        default=None,
        help="default exit step: free's shallow exit, calm's first exit checked, speculation's "
        "draft exit (default: the model's first exit, or its draft's)",
    )
    sv.add_argument(
        "--threshold",
        type=number_or_adaptive,
        default=None,
        metavar="T|adaptive",
        help="default exit threshold of free / calm, in [-1, 1]; 'adaptive': FREE's Beta "
        "mixture, fitted per served model from every request's catch-ups (default: 0.9)",
    )
    sv.add_argument(
        "--confidence",
        default=None,
        choices=choices.SERVED_MEASURES,
        help="default confidence of free / calm (default: margin)",
    )
    sv.add_argument(
        "--deep-kv",
        default=None,
        choices=choices.DEEP_KV,
        help="an exited token's K/V at the steps it skipped: computed later with the next "
        "deep token (catch-up, FREE's default: exact), its exit state's (propagate, calm's "
        "default), or none (skip: each token costs exactly its depth)",
    )
    sv.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        help="default most drafts per round of speculative requests (default: the draft's, else 4)",
    )
    sv.add_argument(
        "--draft",
        default="auto",
        metavar="DIR",
        help="the draft speculative requests draft from: a directory (earlyexit "
        "train-draft), 'auto' (the one shipped for a named model such as smollm2) or 'none'",
    )
    sv.add_argument(
        "--draft-gate",
        default="measured",
        choices=choices.GATES,
        help="whether adaptive speculative rounds draft: 'measured' (the engine times both "
        "ways per batch size and runs the faster, so speculation is not slower than full "
        "depth), 'always', or 'never' (default: measured)",
    )
    sv.add_argument(
        "--allow-untrained-exits",
        action="store_true",
        help="serve free / calm on exits that were never trained (refused with a 400 "
        "otherwise: their tokens are of poor quality)",
    )
    sv.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="temperature of requests that give none (1.0 is OpenAI's convention; the CLI's "
        "generate is greedy, 0; speculative requests are always greedy)",
    )
    sv.add_argument(
        "--exit-vocab",
        type=int,
        default=None,
        metavar="N",
        help="exits decide over the N most frequent tokens of --vocab-data only (a pruned "
        "exit head: cheaper decisions; exited tokens come from those N)",
    )
    sv.add_argument(
        "--vocab-data",
        dest="draft_data",
        default=None,
        metavar="DIR",
        help="--exit-vocab: a prepared corpus whose token counts rank the tokens",
    )
    sv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds requests in flight get to finish after SIGTERM/SIGINT; then they are aborted",
    )
    sv.add_argument(
        "--limit-concurrency",
        type=int,
        default=None,
        help="open connections at most; one more is answered 503 and closed (default: max "
        "batch + max queue + 32, under the open-file limit)",
    )
    sv.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds a connection has to send a complete request; slower ones are closed",
    )
    sv.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the engine (with --replicas: of each replica; default: all "
        "cores in one process, 1 per replica)",
    )
    sv.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="N engine replicas on Ray Serve behind the same API (pip install "
        "'earlyexit[cluster]'; joins the cluster RAY_ADDRESS names, else starts one here)",
    )
    sv.add_argument(
        "--router",
        default="ray",
        choices=("ray", "work"),
        help="with --replicas: Ray Serve's default, the shorter queue of two random replicas "
        "(ray), or the replica owing the fewest layer steps (work; no faster on a 2-core "
        "machine, BENCHMARKS.md 'replicas')",
    )
    add_device_flags(sv)
    sv.set_defaults(func=run)


def _warn_if_public(args: argparse.Namespace) -> None:
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"earlyexit: warning: serving on {args.host}, reachable beyond this machine"
            + ("" if args.api_key else " and without --api-key"),
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    from earlyexit.serve.server import serve

    if args.replicas is not None:
        return run_replicas(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    _warn_if_public(args)
    serve(
        args.model,
        args.host,
        args.port,
        args.policy,
        args.max_batch,
        args.max_len,
        args.max_queue,
        args.api_key,
        args.exit_step,
        args.threshold,
        args.device,
        args.dtype,
        args.name,
        shutdown_timeout=args.shutdown_timeout,
        limit_concurrency=args.limit_concurrency,
        request_timeout=args.request_timeout,
        exit_vocab=frequent_vocab(args, args.exit_vocab, "--exit-vocab"),
        deep_kv=args.deep_kv,
        strategy=args.strategy,
        confidence=args.confidence,
        draft_tokens=args.draft_tokens,
        draft=None if args.draft == "none" else args.draft,
        temperature=args.temperature,
        allow_untrained_exits=args.allow_untrained_exits,
        draft_gate=args.draft_gate,
    )
    return 0


def run_replicas(args: argparse.Namespace) -> int:
    """``serve --replicas N``: the same app on N engine replicas (Ray Serve)."""
    from earlyexit.serve.cluster import ReplicaSpec, require_ray, serve_cluster
    from earlyexit.serve.server import model_name, served_defaults

    require_ray()  # before anything slow: the missing extra is the first thing said
    _warn_if_public(args)
    defaults = served_defaults(
        args.strategy, args.exit_step, args.threshold, args.confidence, args.deep_kv,
        args.draft_tokens, args.temperature, args.shutdown_timeout, args.request_timeout,
        args.limit_concurrency,
    )  # fmt: skip
    name = args.name or model_name(args.model)
    spec = ReplicaSpec(
        model=args.model,
        name=name,
        threads=1 if args.threads is None else args.threads,
        app_kw=dict(
            policy=args.policy,
            max_batch=args.max_batch,
            max_len=args.max_len,
            max_queue=args.max_queue,
            api_key=args.api_key,
            defaults=defaults,
            exit_vocab=frequent_vocab(args, args.exit_vocab, "--exit-vocab"),
            allow_untrained_exits=args.allow_untrained_exits,
            draft_gate=args.draft_gate,
        ),
        load_kw=dict(
            device=args.device,
            dtype=args.dtype,
            draft=None if args.draft == "none" else args.draft,
        ),
    )
    serve_cluster(
        spec,
        args.replicas,
        args.host,
        args.port,
        router=args.router,
        shutdown_timeout=args.shutdown_timeout,
        limit_concurrency=args.limit_concurrency,
        request_timeout=args.request_timeout,
        banner=f"model {name}, policy {args.policy}, max batch {args.max_batch} per replica, "
        f"strategy {defaults.strategy}",
    )
    return 0
