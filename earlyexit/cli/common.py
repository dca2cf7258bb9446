"""Flag groups several commands share (device, precision, sampling, early-exit strategy)
and the help formatter; each command module adds its own flags and these groups."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing

from earlyexit.cli import choices
from earlyexit.errors import InputError


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows each option's default (a list as its words: ``1 8``), unless its help says it
    already or it has none (None, a switch's False, an empty list or string)."""

    def _get_help_string(self, action):
        d = action.default
        if (
            d is None
            or d is False
            or d == ""
            or d == []
            or d is argparse.SUPPRESS
            or not action.option_strings
            or "(default" in (action.help or "")
        ):
            return action.help
        shown = " ".join(map(str, d)) if isinstance(d, list | tuple) else str(d)
        return f"{action.help} (default: {shown.replace('%', '%%')})"


def add_device_flags(p: argparse.ArgumentParser, dtype: str | None = "auto") -> None:
    """``--device`` and ``--dtype`` (default ``dtype``; None: the weights as stored)."""
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    g.add_argument(
        "--dtype",
        default=dtype,
        choices=choices.DTYPE_CHOICES,
        help="weight and compute dtype: auto = bfloat16 where the hardware runs it natively "
        "(AVX512-BF16/AMX CPUs, bf16 GPUs), float32 elsewhere"
        + ("" if dtype else " (default: as stored)"),
    )


def add_precision_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--precision",
        default="auto",
        choices=choices.PRECISIONS,
        help=f"{what}: auto (default) = bfloat16 autocast where the hardware runs bf16 "
        "natively, float32 elsewhere",
    )


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
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


def number_or_adaptive(text: str):
    """An argparse type: a number, or the word ``adaptive`` (draft stops, thresholds)."""
    if text == "adaptive":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'adaptive', got {text!r}") from None


def add_strategy_flags(g: argparse.ArgumentParser) -> None:
    """The early-exit strategy flags (generate, eval agreement, eval lm-eval)."""
    xg = g.add_argument_group("early exit")
    xg.add_argument(
        "--strategy",
        default="full",
        choices=choices.STRATEGIES,
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
        default=choices.DEFAULT_THRESHOLD,
        help="calm/free: exit when confidence passes this, in [-1, 1] (1: never)",
    )
    xg.add_argument(
        "--adaptive", action="store_true", help="free: fit the threshold online (Beta mixture)"
    )
    xg.add_argument(
        "--confidence",
        default="margin",
        choices=choices.MEASURES,
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
        "--deep-kv",
        default=None,
        choices=["propagate", "skip"],
        help="calm: an exited token's K/V at the steps it skipped: its exit state's "
        "(propagate, the default) or none (skip: later tokens attend over those that ran them)",
    )
    xg.add_argument(
        "--draft-k",
        type=int,
        default=None,
        help="speculative: most tokens drafted per deep pass (default: the attached draft's, else 4)",
    )
    xg.add_argument(
        "--draft-stop",
        type=number_or_adaptive,
        default=None,
        metavar="P|adaptive",
        help="speculative: stop drafting at a draft whose probability is below P, or "
        "'adaptive' (when one more draft stops paying for itself, learnt from verifications; "
        "default: the attached draft's, else 0: always draft --draft-k)",
    )
    xg.add_argument(
        "--draft",
        default="auto",
        metavar="DIR",
        help="speculative: a draft directory (earlyexit train-draft) to draft from; 'auto' "
        "(default): the draft shipped for a named model such as smollm2; 'none': no draft",
    )
    xg.add_argument(
        "--draft-vocab",
        type=int,
        default=None,
        metavar="N",
        help="speculative: draft only among the N most frequent tokens of --draft-data (FR-Spec)",
    )
    xg.add_argument(
        "--exit-vocab",
        type=int,
        default=None,
        metavar="N",
        help="free: the shallow exit's head covers only the N most frequent tokens of "
        "--vocab-data (a pruned head: cheaper decisions; exited tokens come from those N)",
    )
    xg.add_argument(
        "--vocab-data",
        "--draft-data",
        dest="draft_data",
        default=None,
        metavar="DIR",
        help="--draft-vocab / --exit-vocab: a prepared corpus whose token counts rank the tokens",
    )
    xg.add_argument(
        "--compile",
        action="store_true",
        help="full: static-shape decode step under torch.compile (CUDA graphs on CUDA)",
    )
    xg.add_argument(
        "--allow-untrained-exits",
        action="store_true",
        help="static/calm/free: run on exits that were never trained (refused otherwise: "
        "their tokens are of poor quality)",
    )


def frequent_vocab(args: argparse.Namespace, n: int | None, flag: str):
    """``flag`` N with --vocab-data DIR: the N most frequent tokens of DIR's training split."""
    if n is None:
        return None
    if n < 1:
        raise InputError(f"{flag} must be >= 1, got {n}")
    if not args.draft_data:
        raise InputError(f"{flag} needs --vocab-data DIR (a prepared corpus to count tokens in)")
    from earlyexit.decoding.speculative import frequent_tokens
    from earlyexit.training.data import token_file

    return frequent_tokens(token_file(args.draft_data, "train"), n)


def draft_vocab(args: argparse.Namespace):
    """--draft-vocab N: the N most frequent tokens of --vocab-data's training split."""
    return frequent_vocab(args, args.draft_vocab, "--draft-vocab")


def strategy_options(args: argparse.Namespace) -> dict:
    """make_strategy keyword arguments from the strategy flags."""
    return dict(
        draft_vocab=draft_vocab(args),
        exit_vocab=frequent_vocab(args, getattr(args, "exit_vocab", None), "--exit-vocab"),
        deep_kv=getattr(args, "deep_kv", None),
        exit_step=args.exit_step,
        threshold=args.threshold,
        adaptive=args.adaptive,
        measure=args.confidence,
        min_exit=args.min_exit,
        decay_tau=args.decay_tau,
        draft_k=args.draft_k,
        draft_stop=getattr(args, "draft_stop", None),
        compile=args.compile,
        allow_untrained=getattr(args, "allow_untrained_exits", False),
    )


def draft_arg(args: argparse.Namespace):
    """``--draft`` as ``earlyexit.load``'s ``draft`` argument."""
    d = getattr(args, "draft", "auto")
    return None if d in (None, "none") else d


def attribute_docs(cls) -> dict[str, str]:
    """Field name -> its line of ``cls``'s docstring ``Attributes:`` table (Google style; an
    entry ``beta1, beta2: ...`` documents both), as plain text: the help of generated flags."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in lines[lines.index("Attributes:") + 1 :] if "Attributes:" in lines else []:
        if line.startswith("    ") and not line.startswith("     ") and ":" in line:
            head, text = line.strip().split(":", 1)
            names = [n.strip() for n in head.split(",")]
            for n in names:
                docs[n] = text.strip()
        elif line.startswith("     ") and names:
            for n in names:
                docs[n] += " " + line.strip()
        elif line.strip():
            break  # the next section
    plain = {}
    for name, text in docs.items():
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")
        plain[name] = text[:-1] if text.endswith(".") else text
    return plain


def _flag_type(hint) -> tuple[type, bool]:
    """(the element type, whether many) of a field's type: ``int | None`` -> (int, False),
    ``tuple[str, ...] | None`` -> (str, True)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) is not tuple:  # X | None
        return _flag_type(args[0])
    if typing.get_origin(hint) is tuple:
        return args[0], True
    return hint, False


def add_dataclass_flags(
    p: argparse.ArgumentParser,
    cls,
    groups: list[tuple[str, str]],
    extras: dict[str, dict] | None = None,
    check=None,
) -> None:
    """One flag per field of the dataclass ``cls``: ``--field-name`` (``dest`` the field's
    name), typed by its annotation (``tuple[T, ...]``: one or more T; ``bool``: a switch with
    a ``--no-`` form), its help the field's docstring line and its default, its choices the
    field's ``metadata["choices"]`` (``check(name, value)`` raising an EarlyExitError then
    refuses a value at parse time with the library's own message). Every flag's default is
    None, so that only the flags given override a recipe or config file. ``groups``: (title,
    space-separated field names) in the order of ``--help``; ``extras``: per field, more
    ``add_argument`` keywords (aliases under ``"aliases"``)."""
    from earlyexit.errors import EarlyExitError

    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for title, names in groups:
        g = p.add_argument_group(title)
        for name in names.split():
            f, kw = by_name[name], dict((extras or {}).get(name, {}))
            flags = [f"--{name.replace('_', '-')}", *kw.pop("aliases", [])]
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = "" if default is None or default is False else f" (default: {default})"
            kw.setdefault("help", f"{docs[name]}{shown}".replace("%", "%%"))
            kind, many = _flag_type(hints[name])
            if kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = kind
                if many:
                    kw["nargs"] = "+"
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
                kw["type"] = _checked(check, name, EarlyExitError) if check else kind
            g.add_argument(*flags, dest=name, default=None, **kw)


def _checked(check, name: str, error: type):
    def parse(text: str):
        try:
            return check(name, text)
        except error as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse
