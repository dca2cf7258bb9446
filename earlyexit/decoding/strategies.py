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
from earlyexit.decoding.confidence import MEASURES
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


def make_strategy(
    model,
    name: str = "full",
    *,
    exit_step: int | None = None,
    threshold: float = 0.9,
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
) -> Strategy:
    """A ready strategy for ``model``; see each strategy's module for the options' meaning.

    ``speculative`` on a model with an attached draft (``earlyexit/drafts.py``) drafts from it
    by default: its exit step, draft vocabulary, ``draft_k`` and ``draft_stop`` (each
    overridable; otherwise ``draft_k`` 4, ``draft_stop`` 0, the full vocabulary).

    ``sync_batch`` None takes each strategy's batched default: CALM's rows exit on their own
    (the rest go on as a smaller batch), FREE's lock-step rows exit together (a lone exit
    would save no deep pass); ``min_sync_rate`` is FREE's batch fallback floor.

    Raises:
        InputError: unknown strategy or measure, an exit step outside the model's depth, a
            threshold outside [-1, 1], a classifier measure on a model without classifiers.
    """
    if name not in STRATEGIES:
        raise InputError(f"unknown strategy {name!r}; available: {', '.join(STRATEGIES)}")
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
    if model.routers is not None:
        raise InputError(
            f"the {name} strategy is for models with exits; this Mixture-of-Recursions model's routers decide each token's depth (use full)"
        )
    cfg = model.config
    L = model.n_steps
    if measure not in MEASURES:
        raise InputError(
            f"unknown confidence measure {measure!r}; available: {', '.join(MEASURES)}"
        )
    if not (
        isinstance(threshold, (int, float)) and math.isfinite(threshold) and -1 <= threshold <= 1
    ):
        raise InputError(
            f"threshold must be in [-1, 1] (1 never exits, -1 always does), got {threshold}"
        )
    if measure == "classifier" and model.exit_classifiers is None:
        raise InputError(
            "--confidence classifier needs a model with exit classifiers (train --objective exit-classifier --exit-classifier)"
        )
    if L < 2:
        raise InputError(f"the {name} strategy needs at least 2 steps; this model has {L}")
    if name == "calm":
        if min_exit is None:
            min_exit = cfg.exits.steps[0] if cfg.exits.steps else 1
        if not 1 <= min_exit <= L:
            raise InputError(f"min_exit must be within [1, {L}], got {min_exit}")
        if decay_tau is not None and not decay_tau > 0:
            raise InputError(f"decay_tau must be > 0, got {decay_tau}")
        if not cfg.exits.steps:
            raise InputError(
                "the calm strategy checks the model's exit points, and this model has none (train with --exit-steps)"
            )
        _warn_untrained(cfg, name)
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
    if exit_step is None:
        if not cfg.exits.steps:
            hint = (
                "pass --exit-step N, or train a draft first (earlyexit train-draft)"
                if name == "speculative"
                else "pass --exit-step N"
            )
            raise InputError(
                f"the {name} strategy needs an exit step: this model has no exit points; {hint}"
            )
        exit_step = cfg.exits.steps[0]
    if not 1 <= exit_step < L:
        raise InputError(
            f"exit step {exit_step} is outside the model's depth: it must be within [1, {L - 1}]"
        )
    if exit_step not in cfg.exits.steps:
        warnings.warn(
            f"step {exit_step} is not an exit point of this model ({list(cfg.exits.steps)}): its "
            f"logits use the final norm and head without exit training, so quality will suffer",
            ExitWarning,
            stacklevel=2,
        )
    else:
        _warn_untrained(cfg, name)
    if model.exit_attention is not None and exit_step in cfg.exits.steps and name != "speculative":
        raise InputError(
            f"the exit after step {exit_step} has an attention adapter (a draft): it serves "
            f"the speculative strategy (lossless), not {name} (to run {name} on another "
            f"step, load without the draft: --draft none --exit-step N)"
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
    draft_k = 4 if draft_k is None else draft_k
    draft_stop = 0.0 if draft_stop is None else draft_stop
    if not 1 <= draft_k <= 32:
        raise InputError(f"draft_k must be within [1, 32], got {draft_k}")
    if draft_stop != "adaptive" and not (
        isinstance(draft_stop, (int, float)) and 0 <= draft_stop < 1
    ):
        raise InputError(
            f"draft_stop (stop drafting below this draft probability) must be within [0, 1) "
            f"or 'adaptive', got {draft_stop!r}"
        )
    return SelfSpeculative(
        exit_step,
        draft_k,
        _ids(draft_vocab, cfg.vocab_size, "draft_vocab"),
        draft_stop,
        stop_prior=stop_prior,
    )


def _ids(ids, vocab_size: int, what: str):
    """Token ids a pruned head covers, validated (None stays None: the full vocabulary)."""
    return None if ids is None else vocabulary_ids(ids, vocab_size, what)


def _warn_untrained(cfg, name: str) -> None:
    if not cfg.exits.trained:
        consequence = (
            "drafts will rarely be accepted and decoding will be slower than full depth"
            if name == "speculative"
            else "early tokens will be of poor quality"
        )
        warnings.warn(
            f"this model's exits were never trained (earlyexit train --objective exits): {consequence}",
            ExitWarning,
            stacklevel=3,
        )
