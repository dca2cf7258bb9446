"""``earlyexit train-draft``: train a draft exit for lossless self-speculation on a frozen
model (attention adapter from cached activations; ``earlyexit/training/draft.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub) -> None:
    """Add ``earlyexit train-draft`` and its flags to the subcommand parsers ``sub``."""
    p = sub.add_parser(
        "train-draft",
        help="train a draft exit (attention adapter) on a frozen model for lossless speculation",
        description=(
            "Self-distil chat answers, cache the frozen model's activations once, then train "
            "an attention-adapter draft exit from the cache. Every stage is kept in --out and "
            "reused when rerun; training resumes from its last checkpoint."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint, HF directory, GGUF file or named model (smollm2)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="a corpus prepared with the model's tokenizer (earlyexit prepare --tokenizer ...)",
    )
    p.add_argument("--out", default="runs/draft", help="working directory (stages are kept here)")
    p.add_argument(
        "--exit-steps",
        type=int,
        nargs="+",
        default=[4],
        help="train a draft at each of these exits",
    )
    p.add_argument(
        "--chat-prompts", type=int, default=512, help="training chat prompts to self-distil"
    )
    p.add_argument(
        "--held-out-prompts", type=int, default=64, help="held-out chat prompts (evaluation)"
    )
    p.add_argument("--answer-tokens", type=int, default=160, help="greedy answer length per prompt")
    p.add_argument("--code-windows", type=int, default=160, help="training windows of the corpus")
    p.add_argument(
        "--held-out-code-windows",
        type=int,
        default=24,
        help="held-out windows of the corpus's validation split",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--topk", type=int, default=32, help="final-layer probabilities kept per position"
    )
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=8192,
        help="tokens the draft head scores (most frequent in the training windows)",
    )
    p.add_argument(
        "--adapter-rank",
        type=int,
        default=0,
        help="add a residual MLP adapter of this rank after the attention",
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--k", type=int, default=4, help="draft length the saved draft defaults to")
    p.add_argument(
        "--stop",
        default="adaptive",
        help="the saved draft's default stop rule: a draft probability, or 'adaptive' (default)",
    )
    p.add_argument(
        "--calibration-prompts",
        type=int,
        default=8,
        help="training chat prompts decoded to calibrate the saved draft's adaptive stop rule (0: none)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    import earlyexit
    from earlyexit.decoding.speculative import frequent_tokens
    from earlyexit.drafts import attach, calibrate_stop, save_draft
    from earlyexit.errors import InputError
    from earlyexit.training.data import token_file
    from earlyexit.training.draft import (
        ActivationCache,
        DraftTrainConfig,
        cache_activations,
        chat_prompts,
        load_windows,
        pack,
        save_windows,
        self_distill,
        stdlib_windows,
        train_draft,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stop != "adaptive":
        try:
            args.stop = float(args.stop)
        except ValueError:
            raise InputError(
                f"--stop must be a probability or 'adaptive', got {args.stop!r}"
            ) from None
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = earlyexit.load(args.model, draft=None)  # the body a draft is trained for
    model = lm.model
    if model.config.exits.steps:
        raise InputError("train-draft starts from a model without exits (its body stays frozen)")
    if lm.chat_config is None:
        raise InputError(f"{args.model}: no chat template; train-draft self-distils chat answers")
    S = args.seq_len

    seq_file = out / "windows.json"
    if not seq_file.is_file():
        train_p, held_p = chat_prompts(seed=args.seed)
        if len(train_p) < args.chat_prompts or len(held_p) < args.held_out_prompts:
            raise InputError(f"only {len(train_p)} / {len(held_p)} chat prompts available")
        say(
            f"self-distilling {args.chat_prompts} + {args.held_out_prompts} chat answers ({args.answer_tokens} tokens each)"
        )
        chat = pack(
            self_distill(lm, train_p[: args.chat_prompts], args.answer_tokens, show=not args.quiet),
            S,
        )
        chat_held = pack(
            self_distill(
                lm, held_p[: args.held_out_prompts], args.answer_tokens, show=not args.quiet
            ),
            S,
        )
        code = stdlib_windows(token_file(args.data, "train"), args.code_windows, S, args.seed)
        code_held = stdlib_windows(
            token_file(args.data, "val"), args.held_out_code_windows, S, args.seed
        )
        save_windows(
            seq_file, {"chat": chat, "chat_held": chat_held, "code": code, "code_held": code_held}
        )
    parts = load_windows(seq_file)
    say("windows: " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()) + f" (x {S} tokens)")
    windows = np.concatenate(list(parts.values()))
    offsets = np.cumsum([0] + [len(v) for v in parts.values()])
    split = {k: np.arange(offsets[i], offsets[i + 1]) for i, k in enumerate(parts)}

    cache_dir = out / "cache"
    steps = tuple(sorted(set(args.exit_steps)))
    try:
        cache = ActivationCache.open(cache_dir)
        if not set(steps) <= set(cache.meta["exit_steps"]) or cache.meta["n"] != len(windows):
            raise InputError("stale")
    except InputError:
        say(f"caching activations of {len(windows)} windows at exits {list(steps)}")
        cache = cache_activations(model, windows, steps, cache_dir, args.topk, show=not args.quiet)
    train_rows = np.concatenate([split["chat"], split["code"]])
    vocab = frequent_tokens(windows[train_rows].ravel(), args.draft_vocab, model.config.vocab_size)
    evals = {"chat": split["chat_held"], "code": split["code_held"]}
    summary = {}
    for s in steps:
        cfg = DraftTrainConfig(
            exit_step=s,
            adapter_rank=args.adapter_rank,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_every=args.eval_every,
            seed=args.seed,
        )
        tag = f"{s}" + (f"-mlp{args.adapter_rank}" if args.adapter_rank else "")
        dm, rows = train_draft(
            model, cache, cfg, vocab, train_rows, evals, out / f"run{tag}", show=not args.quiet
        )
        record = {
            "model": str(args.model),
            "data": {k: len(v) for k, v in parts.items()}
            | {"seq_len": S, "answer_tokens": args.answer_tokens, "corpus": str(args.data)},
            "train": {
                k: getattr(cfg, k) for k in ("adapter_rank", "steps", "batch_size", "lr", "seed")
            },
            "held_out": rows[-1] if rows else {},
            "draft_vocab": args.draft_vocab,
        }
        dst = save_draft(dm, out / f"draft{tag}", vocab, args.k, args.stop, record)
        if args.calibration_prompts:  # the adaptive stop rule's starting counts
            say(f"calibrating the stop rule on {args.calibration_prompts} training prompts")
            train_p, _ = chat_prompts(seed=args.seed)
            room = model.config.max_context - 64
            ids = [lm.encode_chat([{"role": "user", "content": p.text}]) for p in train_p]
            ids = [x for x in ids if len(x) <= room][: args.calibration_prompts]
            prior = calibrate_stop(attach(model, dst), ids, 64, args.k)
            dst = save_draft(dm, dst, vocab, args.k, args.stop, record, stop_prior=prior)
        summary[s] = rows[-1] if rows else {}
        say(f"draft at exit {s}: {dst}")
    print(json.dumps(summary))
    return 0
