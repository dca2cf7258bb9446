"""Building a decoding strategy by name, with the checks a user needs before it runs.

``make_strategy(model, "free", threshold=0.8)`` validates the options against the model
(exit step within the depth, threshold range, classifier present, ...) and warns, naming
the consequence, when an exit strategy runs on exits that were never trained.
"""

from __future__ import annotations

import math
import warnings

from earlyexit.decoding.base import Strategy
from earlyexit.decoding.calm import CALM
from earlyexit.decoding.confidence import DEFAULT_THRESHOLD, MEASURES
from earlyexit.decoding.free import FREE
from earlyexit.decoding.full import FullDepth, StaticExit
from earlyexit.decoding.mor import RouterDepth
from earlyexit.decoding.speculative import SelfSpeculative
from earlyexit.decoding.threshold import BetaMixtureThreshold
from earlyexit.errors import InputError
from earlyexit.models.heads import vocabulary_ids

STRATEGIES = ("full", "static", "calm", "free", "speculative")

# FREE's batch fallback (decoding/free.py): below this share of batched steps that skip the
# deep pass, exits cannot pay for the shallow heads and padded catch-ups. Break-even
# measured on the embedded model (exit at 2 of 8, head = 2.7 blocks): a skipped deep pass
# saves ~56% of a step, a step with catch-ups costs ~54% more than a plain one
# (BENCHMARKS.md, batched-exit), so exits pay above ~50% skipped steps.
FREE_MIN_SYNC_RATE = 0.5


class ExitWarning(UserWarning):
    """An exit strategy runs where its quality cannot be trusted (untrained exits)."""


class OptionError(InputError):
    """A bad strategy option; ``param`` names it as a request field would (the server's
    400 names it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def check_exit(
    model,
    name: str,
    exit_step: int | None,
    *,
    threshold: float | str = DEFAULT_THRESHOLD,
    measure: str = "margin",
    allow_untrained: bool = False,
) -> int:
    """Validate an exiting strategy's options against ``model``; return its exit step (the
    model's default when ``exit_step`` is None: the draft's for ``speculative``, else the
    first exit point). ``calm``'s step is its first exit checked.

    ``make_strategy`` (``generate``) and the serving engine both check through here, so a
    request the server refuses is refused by ``generate`` with the same words.

    Exits that were never trained (and steps that are no exit point at all) are refused for
    the lossy strategies (``static``, ``calm``, ``free``) unless ``allow_untrained``: their
    tokens would be of poor quality (then an :class:`ExitWarning` says so). ``speculative``
    stays exact on any exit, so there it is a warning that it will be slower.

    Raises:
        InputError (an :class:`OptionError`, naming the option): every bad value.
    """
    if model.routers is not None:
        raise OptionError(
            f"the {name} strategy is for models with exits; this Mixture-of-Recursions model's "
            "routers decide each token's depth (use full)",
            "strategy",
        )
    cfg = model.config
    L = model.n_steps
    if measure not in MEASURES:
        raise OptionError(
            f"unknown confidence measure {measure!r}; available: {', '.join(MEASURES)}",
            "confidence",
        )
    adaptive_ok = name == "free"
    if not (threshold == "adaptive" and adaptive_ok) and not (
        isinstance(threshold, (int, float))
        and not isinstance(threshold, bool)
        and math.isfinite(threshold)
        and -1 <= threshold <= 1
    ):
        extra = " or 'adaptive'" if adaptive_ok else ""
        raise OptionError(
            f"threshold must be a number in [-1, 1] (1 never exits, -1 always does){extra}, "
            f"got {threshold!r}",
            "threshold",
        )
    if measure == "classifier" and model.exit_classifiers is None:
        raise OptionError(
            "the classifier confidence needs a model with exit classifiers (train "
            "--objective exit-classifier --exit-classifier)",
            "confidence",
        )
    if L < 2:
        raise OptionError(f"the {name} strategy needs at least 2 steps; this model has {L}")
    draft = getattr(model, "draft", None)
    if exit_step is None:
        if name == "speculative" and draft is not None:
            exit_step = draft.exit_step
        elif cfg.exits.steps:
            exit_step = cfg.exits.steps[0]
        else:
            hint = (
                "pass an exit step, or train a draft first (earlyexit train-draft)"
                if name == "speculative"
                else "pass an exit step"
            )
            raise OptionError(
                f"the {name} strategy needs an exit step: this model has no exit points; {hint}",
                "exit_step",
            )
    if isinstance(exit_step, bool) or not isinstance(exit_step, int) or not 1 <= exit_step < L:
        raise OptionError(
            f"exit step {exit_step} is outside the model's depth: it must be within [1, {L - 1}]",
            "exit_step",
        )
    if name == "calm":
        if not cfg.exits.steps:
            raise OptionError(
                "the calm strategy checks the model's exit points, and this model has none "
                "(train with --exit-steps)",
                "strategy",
            )
        checked = [e for e in cfg.exits.steps if e >= exit_step]
        trained = cfg.exits.trained or not checked  # nothing checked: it never exits
    else:
        checked = [exit_step]
        trained = cfg.exits.trained and exit_step in cfg.exits.steps
    if (
        model.exit_attention is not None
        and name != "speculative"
        and set(checked) & set(cfg.exits.steps)
    ):
        raise OptionError(
            f"the exit after step {cfg.exits.steps[0]} has an attention adapter (a draft): "
            f"it serves the speculative strategy (lossless), not {name} (to run {name} "
            "on another step, load without the draft: --draft none, and pass an exit step)",
            "exit_step",
        )
    if not trained:
        what = (
            f"step {exit_step} is not an exit point of this model ({list(cfg.exits.steps)}): "
            "its logits use the final norm and head without exit training"
            if exit_step not in cfg.exits.steps and name != "calm"
            else "this model's exits were never trained"
        )
        if name == "speculative":
            warnings.warn(
                f"{what}: drafts will rarely be accepted and decoding will be slower than "
                "full depth (the output is still exact); use a trained draft (the shipped "
                "one for named models, or earlyexit train-draft)",
                ExitWarning,
                stacklevel=3,
            )
        elif not allow_untrained:
            raise OptionError(
                f"{what}, so {name} would emit poor tokens. Train an exit first (earlyexit "
                "train --preset smollm2-exit for SmolLM2, or --objective exits), use the "
                "lossless speculative strategy, or allow it explicitly "
                "(--allow-untrained-exits; the server's --allow-untrained-exits)",
                "exit_step",
            )
        else:
            warnings.warn(
                f"{what}: {name} will emit poor tokens wherever it exits (quality far below "
                "full depth; allowed by --allow-untrained-exits)",
                ExitWarning,
                stacklevel=3,
            )
    return exit_step


def make_strategy(
    model,
    name: str = "full",
    *,
    exit_step: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    adaptive: bool = False,
    measure: str = "margin",
    min_exit: int | None = None,
    decay_tau: float | None = None,
    draft_k: int | None = None,
    draft_vocab=None,
    draft_stop: float | str | None = None,
    exit_vocab=None,
    deep_kv: str | None = None,
    sync_batch: bool | None = None,
    calibrator: BetaMixtureThreshold | None = None,
    compile: bool = False,
    min_sync_rate: float | None = FREE_MIN_SYNC_RATE,
    allow_untrained: bool = False,
) -> Strategy:
    """A ready strategy for ``model``; see each strategy's module for the options' meaning.

    ``speculative`` on a model with an attached draft (``earlyexit/drafts.py``) drafts from it
    by default: its exit step, draft vocabulary, ``draft_k`` and ``draft_stop`` (each
    overridable; otherwise ``draft_k`` 4, ``draft_stop`` 0, the full vocabulary).

    ``sync_batch`` None takes each strategy's batched default: CALM's rows exit on their own
    (the rest go on as a smaller batch), FREE's lock-step rows exit together (a lone exit
    would save no deep pass); ``min_sync_rate`` is FREE's batch fallback floor.
    ``allow_untrained``: run a lossy strategy on exits that were never trained (see
    :func:`check_exit`).

    Raises:
        InputError: unknown strategy or measure, an exit step outside the model's depth, a
            threshold outside [-1, 1], a classifier measure on a model without classifiers,
            a lossy strategy on untrained exits.
    """
    if name not in STRATEGIES:
        raise OptionError(
            f"unknown strategy {name!r}; available: {', '.join(STRATEGIES)}", "strategy"
        )
    if exit_vocab is not None and name != "free":
        raise InputError(
            f"exit_vocab (a pruned exit head) applies to the free strategy, not {name!r}"
            + (" (drafts take draft_vocab)" if name == "speculative" else "")
        )
    if deep_kv is not None and (name != "calm" or deep_kv not in ("propagate", "skip")):
        raise InputError(
            f"deep_kv {deep_kv!r}: calm takes 'propagate' (CALM's state propagation) or "
            "'skip' (leave the skipped steps' KV missing); free always catches up (exact KV)"
        )
    if name == "full":  # a MoR model's "full" depth is whatever its routers grant
        return (
            FullDepth(static=compile, compile=compile) if model.routers is None else RouterDepth()
        )
    if compile:
        raise InputError("--compile applies to the full strategy only (a static-shape decode step)")
    cfg = model.config
    L = model.n_steps
    if name == "calm":
        if min_exit is None and model.routers is None:
            min_exit = cfg.exits.steps[0] if cfg.exits.steps else 1
        if min_exit is not None and not 1 <= min_exit <= L:
            raise InputError(f"min_exit must be within [1, {L}], got {min_exit}")
        if decay_tau is not None and not decay_tau > 0:
            raise InputError(f"decay_tau must be > 0, got {decay_tau}")
        check_exit(
            model,
            name,
            min(min_exit, L - 1),
            threshold=threshold,
            measure=measure,
            allow_untrained=allow_untrained,
        )
        return CALM(
            threshold, min_exit, decay_tau, measure, bool(sync_batch), deep_kv or "propagate"
        )
    draft = getattr(model, "draft", None)
    stop_prior = None
    if name == "speculative" and draft is not None and exit_step in (None, draft.exit_step):
        exit_step = draft.exit_step
        stop_prior = draft.stop_prior
        draft_k = draft.k if draft_k is None else draft_k
        draft_stop = draft.stop if draft_stop is None else draft_stop
        draft_vocab = draft.vocab if draft_vocab is None else draft_vocab
    exit_step = check_exit(
        model,
        name,
        exit_step,
        threshold=threshold,
        measure=measure,
        allow_untrained=allow_untrained,
    )
    if name == "static":
        return StaticExit(exit_step)
    if name == "free":
        if min_sync_rate is not None and not 0 <= min_sync_rate <= 1:
            raise InputError(f"min_sync_rate must be within [0, 1] (or None), got {min_sync_rate}")
        return FREE(
            exit_step,
            threshold,
            adaptive,
            measure,
            calibrator,
            min_sync_rate,
            exit_vocab=_ids(exit_vocab, cfg.vocab_size, "exit_vocab"),
            # lock-step batches exit together (decoding/free.py): a lone exit saves nothing
            sync_batch=True if sync_batch is None else sync_batch,
        )
    draft_k, draft_stop = check_draft(draft_k, draft_stop)
    return SelfSpeculative(
        exit_step,
        draft_k,
        _ids(draft_vocab, cfg.vocab_size, "draft_vocab"),
        draft_stop,
        stop_prior=stop_prior,
    )


def check_draft(draft_k: int | None, draft_stop: float | str | None) -> tuple[int, float | str]:
    """Speculation's draft length and stop rule, validated (None: 4 and 0, never stop early)."""
    draft_k = 4 if draft_k is None else draft_k
    draft_stop = 0.0 if draft_stop is None else draft_stop
    if isinstance(draft_k, bool) or not isinstance(draft_k, int) or not 1 <= draft_k <= 32:
        raise OptionError(
            f"draft_k must be an integer within [1, 32], got {draft_k!r}", "draft_tokens"
        )
    if draft_stop != "adaptive" and not (
        isinstance(draft_stop, (int, float)) and 0 <= draft_stop < 1
    ):
        raise OptionError(
            f"draft_stop (stop drafting below this draft probability) must be within [0, 1) "
            f"or 'adaptive', got {draft_stop!r}",
            "draft_stop",
        )
    return draft_k, draft_stop


def _ids(ids, vocab_size: int, what: str):
    """Token ids a pruned head covers, validated (None stays None: the full vocabulary)."""
    return None if ids is None else vocabulary_ids(ids, vocab_size, what)
