"""``earlyexit generate``: text from a checkpoint, at the depth a strategy picks per token."""

from __future__ import annotations

import argparse
import json
import sys
import time

from earlyexit.cli.common import (
    add_device_flags,
    add_sampling_flags,
    add_strategy_flags,
    draft_arg,
    strategy_options,
)
from earlyexit.errors import InputError


def register(sub) -> None:
    """Add ``earlyexit generate`` and its flags to the subcommand parsers ``sub``."""
    g = sub.add_parser("generate", help="generate text from a checkpoint or Hugging Face directory")
    g.add_argument("prompt", nargs="*", help="the prompt (default or '-': read standard input)")
    g.add_argument(
        "--model",
        required=True,
        help="earlyexit checkpoint, Hugging Face directory, GGUF file, or a named model (smollm2)",
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
    add_strategy_flags(g)
    g.add_argument(
        "--json", action="store_true", help="print one JSON object: text, token_ids, depths, ..."
    )
    add_sampling_flags(g)
    add_device_flags(g)
    g.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
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
    lm = earlyexit.load(args.model, device=args.device, dtype=args.dtype, draft=draft_arg(args))
    params.validate(lm.config.vocab_size)
    if args.chat:  # the prompt is the user's message, in the model's own chat template
        if args.ids:
            raise InputError("--chat takes a message, not token ids (--ids)")
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt_in = lm.encode_chat([*messages, {"role": "user", "content": prompt_in}])
    prompt_ids = lm.encode(prompt_in)  # text through the tokenizer, ids as given
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy = make_strategy(lm.model, args.strategy, **strategy_options(args))
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
