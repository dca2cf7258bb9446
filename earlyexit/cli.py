"""``earlyexit <command>``: the command-line interface.

Each command parses its flags here and calls one typed function of the library (the same
functions the Python API exposes). User errors print one line (``earlyexit: error: ...``) and
exit with status 1; usage errors exit with 2 (argparse); never a traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from earlyexit.errors import EarlyExitError, InputError


# ---------------------------------------------------------------------- shared flags
class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help says it already or it has none."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weight and compute dtype (default: as stored)",
    )


def _add_precision_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help=f"{what}: auto (default) = bfloat16 autocast where the hardware runs bf16 "
        "natively, float32 elsewhere",
    )


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    g.add_argument(
        "--top-k", type=int, default=-1, help="keep the k most likely tokens; -1 or 0 = disabled"
    )
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = disabled"
    )
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop string (repeatable); the text is cut before it",
    )
    g.add_argument(
        "--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens"
    )


# ---------------------------------------------------------------------- generate
def _read_prompt(args: argparse.Namespace) -> str | list[int]:
    prompt = " ".join(args.prompt) if args.prompt else None
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise InputError("no prompt: pass it as an argument or on standard input")
        prompt = sys.stdin.read()
    if args.ids:
        try:
            ids = [int(t) for t in prompt.replace(",", " ").split()]
        except ValueError:
            raise InputError("--ids expects comma- or space-separated integers") from None
        if not ids:
            raise InputError("the prompt is empty")
        return ids
    if not prompt.strip():
        raise InputError("the prompt is empty")
    return prompt


# 256-colour ramp from green (shallow) to red (full depth)
_RAMP = (46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)


def _colour(text: str, depth: int, n_steps: int) -> str:
    c = _RAMP[round((len(_RAMP) - 1) * (depth - 1) / max(n_steps - 1, 1))]
    return f"\x1b[38;5;{c}m{text}\x1b[0m"


def cmd_generate(args: argparse.Namespace) -> int:
    import warnings

    import earlyexit
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.decoding.strategies import make_strategy

    prompt_in = _read_prompt(args)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    ).validate()
    lm = earlyexit.load(args.model, device=args.device, dtype=args.dtype)
    params.validate(lm.config.vocab_size)
    if args.chat:  # the prompt is the user's message, in the model's own chat template
        if args.ids:
            raise InputError("--chat takes a message, not token ids (--ids)")
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt_in = lm.encode_chat([*messages, {"role": "user", "content": prompt_in}])
    prompt_ids = lm.encode(prompt_in)  # text through the tokenizer, ids as given
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy = make_strategy(lm.model, args.strategy, **_strategy_options(args))
    for w in caught:
        print(f"earlyexit: warning: {w.message}", file=sys.stderr)
    L = lm.model.n_steps
    colour = args.show_depth and (
        args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    )
    t0 = time.perf_counter()
    if (args.stream or args.show_depth) and not args.json:
        result = None
        events = []
        if colour:
            legend = " ".join(_colour(str(d), d, L) for d in range(1, L + 1))
            print(f"depth: {legend}", file=sys.stderr)
        for ev in lm.stream(prompt_ids, params, strategy=strategy):
            events.append(ev)
            text = ev.text if ev.text is not None else f"{ev.token_id} "
            sys.stdout.write(_colour(text, ev.depth, L) if colour else text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        n, depths = len(events), [e.depth for e in events]
        finish = events[-1].finish_reason if events else ""
        if args.show_depth and not colour:  # a pipe or --color never: the depths as numbers
            print(f"depths: {' '.join(map(str, depths))}", file=sys.stderr)
    else:
        result = lm.generate(prompt_ids, params, strategy=strategy)
        n, depths, finish = len(result.token_ids), result.depths, result.finish_reason
    dt = time.perf_counter() - t0
    exit_rate = sum(d < L for d in depths) / max(n, 1)
    if args.json:
        out = result.to_dict() if result is not None else {}
        out.update(
            model=str(args.model),
            prompt_ids=prompt_ids,
            strategy=strategy.name,
            strategy_stats=strategy.stats(),
            n_steps=L,
            exit_rate=exit_rate,
            seconds=round(dt, 4),
            tokens_per_second=round(n / dt, 2),
        )
        print(json.dumps(out, ensure_ascii=False))
    else:
        if result is not None:
            print(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
        mean = sum(depths) / max(n, 1)
        extra = ""
        st = strategy.stats()
        if "threshold" in st:
            extra += f", threshold {st['threshold']:.3g}"
        if "acceptance_rate" in st:
            extra += f", drafts accepted {st['acceptance_rate']:.0%}"
        print(
            f"[{strategy.name}: {n} tokens, finish={finish}, mean depth {mean:.2f}/{L}, "
            f"exit rate {exit_rate:.0%}{extra}, {n / dt:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


# ---------------------------------------------------------------------- convert
def _check_dst(dst: str, force: bool) -> None:
    p = Path(dst)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not force:
        raise InputError(f"{dst}: already exists; pass --force to replace it")


def cmd_convert(args: argparse.Namespace) -> int:
    import earlyexit
    from earlyexit.chat import chat_files
    from earlyexit.checkpoint import save_checkpoint
    from earlyexit.models import hf
    from earlyexit.models.gguf import gguf_import, is_gguf
    from earlyexit.registry import resolve_model

    _check_dst(args.dst, args.force)
    info: dict = {}
    src = resolve_model(args.src)  # a named model: its cached checkpoint
    if args.kind == "gguf-import" or (args.kind == "hf-import" and is_gguf(src)):
        out = gguf_import(src, args.dst)
    elif args.kind == "hf-import":
        out = hf.hf_import(src, args.dst)
    elif args.kind == "hf-export":
        lm = earlyexit.load(src, device="cpu")
        out = hf.hf_export(lm.model, args.dst, lm.tokenizer)
    elif args.kind == "recursive":
        from earlyexit.models.recursive import convert_recursive

        lm = earlyexit.load(src, device="cpu")  # ours, a HF directory, GGUF, or a name
        model = convert_recursive(
            lm.model,
            args.loops,
            args.sharing,
            args.init,
            _lora_config(args),
            args.lora_init,
            args.seed,
        )
        out = save_checkpoint(model, args.dst, lm.tokenizer, chat_files(lm.chat_config))
        counts = model.config.param_counts()
        info = {
            "non_embedding_params": counts["non_embedding"],
            "source_non_embedding_params": lm.config.param_counts()["non_embedding"],
        }
    else:  # merge
        from earlyexit.models.recursive import unroll

        lm = earlyexit.load(src, device="cpu")
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


# ---------------------------------------------------------------------- prepare / train / eval
def cmd_prepare(args: argparse.Namespace) -> int:
    from earlyexit.training.corpus import prepare

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    m = prepare(args.corpus, args.out, args.vocab_size, args.tokenizer, args.val_fraction, say)
    if args.json:
        print(
            json.dumps(
                {k: m[k] for k in ("counts", "tokenizer", "dtype", "eot_id")} | {"out": args.out}
            )
        )
    return 0


def train_config_from_args(args: argparse.Namespace):
    """The TrainConfig a ``train`` command line describes: recipe or file, then flags."""
    from earlyexit.training.loop import RECIPES, TrainConfig

    flags = {
        k: v
        for k, v in vars(args).items()
        if k in TrainConfig.__dataclass_fields__ and v is not None
    }
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


def cmd_train(args: argparse.Namespace) -> int:
    from earlyexit.training.loop import train

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


def cmd_eval(args: argparse.Namespace) -> int:
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
            _strategy_options(args) if args.strategy != "full" else {"compile": args.compile},
            n_prompts=args.prompts,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            device=args.device,
            dtype=args.dtype,
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
    opts = {k: v for k, v in _strategy_options(args).items() if v is not None}
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


# ---------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
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
        return 1 if run_all(skip, args.dry_run, device=device, precision=args.precision) else 0
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
            max_batch=args.max_batch,
            threads=args.threads,
            out=out,
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
        )
    if args.json:
        print(json.dumps(rows))
    print(f"rows written to {out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from earlyexit.serve.server import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"earlyexit: warning: serving on {args.host}, reachable beyond this machine"
            + ("" if args.api_key else " and without --api-key"),
            file=sys.stderr,
        )
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
    )
    return 0


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from earlyexit.demo import main as demo_main

    return demo_main(
        out_dir=args.out,
        quick=args.quick,
        as_json=args.json,
        model=args.model,
        threads=args.threads,
        progress=not args.no_progress,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
    )


# ---------------------------------------------------------------------- parser
def _add_strategy_flags(g: argparse.ArgumentParser) -> None:
    """The early-exit strategy flags (generate, eval agreement, eval lm-eval)."""
    xg = g.add_argument_group("early exit")
    xg.add_argument(
        "--strategy",
        default="full",
        choices=["full", "static", "calm", "free", "speculative"],
        help="which steps each token runs (default: full)",
    )
    xg.add_argument(
        "--exit-step",
        type=int,
        default=None,
        help="static/free/speculative: the shallow exit (default: the model's first exit)",
    )
    xg.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="calm/free: exit when confidence passes this, in [-1, 1] (1: never)",
    )
    xg.add_argument(
        "--adaptive", action="store_true", help="free: fit the threshold online (Beta mixture)"
    )
    xg.add_argument(
        "--confidence",
        default="margin",
        choices=["margin", "max-prob", "saturation", "classifier"],
        help="calm/free: confidence measure",
    )
    xg.add_argument(
        "--min-exit",
        type=int,
        default=None,
        help="calm: first exit to check (default: the first exit)",
    )
    xg.add_argument(
        "--decay-tau",
        type=float,
        default=None,
        help="calm: decaying threshold temperature (default: constant)",
    )
    xg.add_argument(
        "--draft-k", type=int, default=4, help="speculative: tokens drafted per deep pass"
    )
    xg.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="speculative: draft only among the N most frequent tokens of --draft-data (FR-Spec)",
    )
    xg.add_argument(
        "--draft-data",
        default=None,
        metavar="DIR",
        help="speculative --draft-vocab: a prepared corpus whose token counts rank the tokens",
    )
    xg.add_argument(
        "--compile",
        action="store_true",
        help="full: static-shape decode step under torch.compile (CUDA graphs on CUDA)",
    )


def _draft_vocab(args: argparse.Namespace):
    """--draft-vocab N --draft-data DIR: the N most frequent tokens of DIR's training split."""
    if args.draft_vocab is None:
        return None
    if not args.draft_data:
        raise InputError(
            "--draft-vocab needs --draft-data DIR (a prepared corpus to count tokens in)"
        )
    from earlyexit.decoding.speculative import frequent_tokens
    from earlyexit.training.data import token_file

    return frequent_tokens(token_file(args.draft_data, "train"), args.draft_vocab)


def _strategy_options(args: argparse.Namespace) -> dict:
    """make_strategy keyword arguments from the strategy flags."""
    return dict(
        draft_vocab=_draft_vocab(args),
        exit_step=args.exit_step,
        threshold=args.threshold,
        adaptive=args.adaptive,
        measure=args.confidence,
        min_exit=args.min_exit,
        decay_tau=args.decay_tau,
        draft_k=args.draft_k,
        compile=args.compile,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="earlyexit",
        description="Adaptive-depth LLM inference: FREE early exit, Relaxed Recursive Transformers, Mixture-of-Recursions.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a checkpoint or Hugging Face directory")
    g.add_argument("prompt", nargs="*", help="the prompt (default or '-': read standard input)")
    g.add_argument(
        "--model", required=True, help="earlyexit checkpoint or Hugging Face model directory"
    )
    g.add_argument(
        "--ids", action="store_true", help="the prompt is token ids (comma or space separated)"
    )
    g.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user message: apply the model's chat template (instruct models)",
    )
    g.add_argument("--system", default=None, help="--chat: a system message before it")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument(
        "--show-depth",
        action="store_true",
        help="colour each token by the depth it ran (streams); without colour, the depths are "
        "listed on stderr",
    )
    g.add_argument(
        "--color",
        "--colour",
        default="auto",
        choices=["auto", "always", "never"],
        help="--show-depth colours: auto (default) = only when stdout is a terminal",
    )
    _add_strategy_flags(g)
    g.add_argument(
        "--json", action="store_true", help="print one JSON object: text, token_ids, depths, ..."
    )
    _add_sampling_flags(g)
    _add_device_flags(g)
    g.set_defaults(func=cmd_generate)

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
        choices=["cycle", "sequence", "middle_cycle", "middle_sequence"],
        help="sharing scheme",
    )
    rg.add_argument(
        "--init",
        default="stepwise",
        choices=["stepwise", "average", "lower", "random"],
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
        choices=["svd", "zero"],
        help="svd: truncated SVD of the residual; zero: standard init",
    )
    rg.add_argument("--seed", type=int, default=0, help="seed of random and standard inits")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_convert)

    pr = sub.add_parser(
        "prepare", help="tokenize a corpus for training (default: the Python standard library)"
    )
    pr.add_argument(
        "--corpus",
        nargs="+",
        default=["stdlib"],
        help="stdlib, files, folders, globs, or hf:NAME (several allowed)",
    )
    pr.add_argument("--out", default="data/stdlib", help="output directory")
    pr.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="BPE vocabulary to train (special token included)",
    )
    pr.add_argument(
        "--tokenizer", default=None, help="use this tokenizer.json instead of training one"
    )
    pr.add_argument(
        "--val-fraction",
        type=float,
        default=0.02,
        help="share of documents held out for validation",
    )
    pr.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    pr.set_defaults(func=cmd_prepare)

    t = sub.add_parser("train", help="train or fine-tune a model (also under torchrun)")
    t.add_argument("--preset", default=None, help="a named recipe (stdlib-small)")
    t.add_argument("--config", default=None, help="a TrainConfig JSON file (flags override it)")
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
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model")
    e.add_argument(
        "kind",
        choices=["perplexity", "agreement", "lm-eval"],
        help="perplexity: validation NLL of a prepared corpus; agreement: a strategy's output "
        "vs full depth (token match, ROUGE-L, speedup); lm-eval: lm-evaluation-harness tasks",
    )
    e.add_argument("--model", required=True, help="checkpoint or Hugging Face directory")
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
        choices=["causal", "topk"],
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
    _add_strategy_flags(e)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_device_flags(e)
    e.set_defaults(func=cmd_eval)

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
    b.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="batch sizes to run")
    b.add_argument(
        "--draft-vocab",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="early-exit: add self-speculation drafting over the N most frequent tokens of "
        "--data's training split (FR-Spec)",
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
    _add_precision_flag(b, "conversion/mor-isoflop: compute of the trainings they run")
    _add_device_flags(b)
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (FastAPI + uvicorn)",
        formatter_class=_DefaultsFormatter,
    )
    sv.add_argument("--model", required=True, help="checkpoint or Hugging Face model directory")
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
        choices=["static", "continuous", "depthwise"],
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
        "--exit-step", type=int, default=None, help="default early exit for requests (FREE)"
    )
    sv.add_argument(
        "--threshold", type=float, default=None, help="default exit threshold (implies early exit)"
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
    _add_device_flags(sv)
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="the main job: what earlyexit does, end to end, no downloads")
    d.add_argument("--out", default=None, help="work directory (default: ~/.cache/earlyexit/demo)")
    d.add_argument("--quick", action="store_true", help="a seconds-long version (CI smoke test)")
    d.add_argument(
        "--model",
        default=None,
        help="run the measurements on your model (directory or hub name) instead of training",
    )
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_precision_flag(d, "compute of the demo's trainings")
    _add_device_flags(d)
    d.set_defaults(func=cmd_demo)
    return p


def _version() -> str:
    from earlyexit import __version__

    return f"earlyexit {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EarlyExitError as e:
        print(f"earlyexit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("earlyexit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
