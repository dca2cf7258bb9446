"""Batched generation on top of any :class:`Strategy`: sampling, stopping, streaming.

- Prompts of different lengths share one batch: they are right-padded, each row's cache
  length is its own, and positions continue per row (``models/kv_cache.py``).
- One host sync per step for the whole batch (the sampled ids, needed to decide stops).
- Rows that finish stop advancing their cache (``n_new = 0``) while the others go on.
- Stop tokens (the model's end-of-sequence ids unless ``ignore_eos``, plus
  ``stop_token_ids``), stop strings (text cut before the match; streamed text is held back
  by ``len(stop) - 1`` characters so it never shows part of a stop string), ``max_new_tokens``
  and the model's context each end a row.
- Every generated token reports its depth: the number of plan steps it ran.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from earlyexit.decoding.base import Strategy
from earlyexit.decoding.full import FullDepth
from earlyexit.decoding.mor import RouterDepth
from earlyexit.decoding.sampling import SamplingParams, apply_penalties, make_generator, sample
from earlyexit.errors import InputError
from earlyexit.models.decoder import Decoder
from earlyexit.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class TokenEvent:
    """One generated token of one row, as streamed.

    Attributes:
        row: index of the prompt in the batch.
        token_id: the token.
        depth: plan steps this token ran.
        text: text completed by this token ('' while held back; None without a tokenizer).
        finish_reason: None while the row goes on; ``stop`` or ``length`` on its last token.
    """

    row: int
    token_id: int
    depth: int
    text: str | None
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    """A finished row: its tokens, the depth of each, its text and why it stopped."""

    token_ids: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = ""
    prompt_tokens: int = 0

    @property
    def mean_depth(self) -> float:
        return sum(self.depths) / max(len(self.depths), 1)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "depths": self.depths,
            "mean_depth": self.mean_depth,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
        }


def check_prompts(prompts: Sequence[Sequence[int]], model: Decoder) -> list[list[int]]:
    """Validate token-id prompts against the model's vocabulary and context."""
    cfg = model.config
    if len(prompts) == 0:
        raise InputError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise InputError(f"prompt {i} is empty")
        if len(p) >= cfg.max_context:
            raise InputError(
                f"prompt {i} has {len(p)} tokens; the model's context is {cfg.max_context}, "
                f"which leaves no room to generate"
            )
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise InputError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        out.append(p)
    return out


class OutputTracker:
    """One sequence's output bookkeeping (host only): tokens, depths, incremental text, stop
    strings with streaming hold-back. Shared by ``generate`` and the serving engine."""

    def __init__(self, prompt_len: int, tokenizer: Tokenizer | None, stops: tuple[str, ...]):
        self.result = GenerationResult(prompt_tokens=prompt_len)
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.emitted = 0  # characters of text already streamed
        self.done = False

    def push(self, token: int, depth: int) -> tuple[str | None, bool]:
        """Record a token; return (text to stream now, whether a stop string matched)."""
        r = self.result
        r.token_ids.append(token)
        r.depths.append(depth)
        if self.decoder is None:
            return None, False
        self.decoder.push(token)
        text = self.decoder.text
        if self.stops:
            start = max(0, self.emitted - self.hold)
            hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
            if hits:
                cut = min(hits)
                delta, self.emitted = text[self.emitted : cut], cut
                r.text = text[:cut]
                return delta, True
        safe = len(text) - self.hold
        if safe > self.emitted:
            delta, self.emitted = text[self.emitted : safe], safe
            return delta, False
        return "", False

    def finish(self, reason: str) -> str | None:
        """Mark done; return the held-back tail of the text."""
        self.done = True
        self.result.finish_reason = reason
        if self.decoder is None:
            return None
        if self.result.text is None:  # not cut by a stop string: the full text, even if
            self.result.text = self.decoder.tokenizer.decode(
                self.result.token_ids
            )  # it ends mid-character
        tail = self.result.text[self.emitted :]
        self.emitted = len(self.result.text)
        return tail


def stream(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    tokenizer: Tokenizer | None = None,
    strategy: Strategy | None = None,
) -> Iterator[TokenEvent]:
    """Generate for a batch of token-id prompts, yielding each token as it is produced.

    Args:
        model: the decoder (eval mode).
        prompts: token ids per row; lengths may differ.
        params: sampling and stopping (validated here).
        tokenizer: turns tokens into text for events, results and stop strings.
        strategy: which steps each token runs (default: full depth).
    """
    for ev, _ in _run(model, prompts, params, tokenizer, strategy):
        yield ev


def _run(
    model, prompts, params, tokenizer, strategy
) -> Iterator[tuple[TokenEvent, GenerationResult | None]]:
    """The generation loop; yields each event with the row's result when the row finishes."""
    params = (params or SamplingParams()).validate(model.config.vocab_size)
    if params.stop and tokenizer is None:
        raise InputError("stop strings need a tokenizer")
    prompts = check_prompts(prompts, model)
    if strategy is None:
        strategy = FullDepth() if model.routers is None else RouterDepth()
    if strategy.greedy_only and params.temperature > 0:
        raise InputError(
            f"the {strategy.name} strategy is greedy-only (it is lossless against greedy "
            f"full-depth decoding); use temperature 0"
        )
    penalized = bool(params.presence_penalty or params.frequency_penalty)
    if strategy.greedy_only and penalized:
        raise InputError(
            f"the {strategy.name} strategy decides tokens itself; presence and frequency "
            f"penalties need another strategy"
        )
    cfg = model.config
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    dev = model.tok_embeddings.weight.device
    length = int(min(cfg.max_context, lens.max() + params.max_new_tokens)) + strategy.cache_slack
    cache = strategy.make_cache(model, B, length)
    padded = torch.zeros(B, int(lens.max()), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, : len(p)] = torch.tensor(p)
    stop_ids = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        stop_ids |= set(cfg.eos_token_ids)
    gen = make_generator(params.seed, dev)
    rows = [OutputTracker(int(n), tokenizer, params.stop) for n in lens]

    with torch.inference_mode():
        strategy.begin(model, cache, B, params.max_new_tokens)
        out = strategy.prefill(model, cache, padded.to(dev), lens)
        while True:
            if out.tokens is None:
                logits = out.logits
                if penalized:
                    logits = apply_penalties(
                        logits,
                        [r.result.token_ids for r in rows],
                        [params.presence_penalty] * B,
                        [params.frequency_penalty] * B,
                    )
                nxt = sample(logits, params.temperature, params.top_k, params.top_p, gen)
                toks = [[t] for t in nxt.tolist()]  # the one host sync of the step
                deps = [[d] for d in out.depths]
            else:  # the strategy decided one or more tokens per row itself
                toks, deps = out.tokens, out.token_depths
            for b, row in enumerate(rows):
                for tok, depth in zip(toks[b], deps[b]):
                    if row.done:
                        break
                    text, stopped = row.push(tok, depth)
                    reason = None
                    n = len(row.result.token_ids)
                    if stopped or tok in stop_ids:
                        reason = "stop"
                    elif n >= params.max_new_tokens or lens[b] + n >= cfg.max_context:
                        reason = "length"
                    if reason is not None:
                        tail = row.finish(reason)
                        text = None if text is None else text + (tail or "")
                    event = TokenEvent(b, tok, depth, text, reason)
                    yield event, (row.result if reason is not None else None)
            if all(r.done for r in rows):
                return
            n_new = np.array([0 if r.done else 1 for r in rows], dtype=np.int64)
            last = torch.tensor([t[-1] for t in toks], device=dev)  # (B,) next input per row
            out = strategy.decode(model, cache, last, None if n_new.all() else n_new)


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    tokenizer: Tokenizer | None = None,
    strategy: Strategy | None = None,
) -> list[GenerationResult]:
    """Like :func:`stream`, but return one :class:`GenerationResult` per prompt."""
    results: list[GenerationResult] = [GenerationResult() for _ in prompts]
    for ev, result in _run(model, prompts, params, tokenizer, strategy):
        if result is not None:
            results[ev.row] = result
    return results
