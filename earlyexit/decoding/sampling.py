"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p).

- :class:`SamplingParams` carries what a request asks for (vLLM-style): sampling knobs,
  length, stop tokens and stop strings; :meth:`SamplingParams.validate` refuses bad values
  with one clear line.
- :func:`sample` is vectorised over rows with per-row parameters (the engine batches
  requests with different settings). The parameters are host values, so deciding greedy vs
  sampled never reads the device; randomness comes from explicit ``torch.Generator``s
  (one for the batch, or one per row) through the exponential race
  ``argmax(p / Exp(1))``, which samples from ``p`` without ``multinomial``'s host sync.
- Order of operations as in Hugging Face: temperature, then top-k, then top-p.
- Extreme values stay finite: a temperature below ``GREEDY_BELOW`` (1e-5, vLLM's rule) is
  greedy, since dividing logits by it overflows float32; top-p always keeps the most likely
  token, however small ``top_p`` is (a ``top_p`` that rounds to 0 in float32 would drop
  every token and turn the distribution into NaN).
- OpenAI's presence and frequency penalties (:func:`apply_penalties`) are subtracted from
  the logits before sampling, greedy included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from earlyexit.errors import InputError

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does)


@dataclass
class SamplingParams:
    """What one generation request asks for.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy; > 0 samples from softmax(logits / temperature).
        top_k: keep the k most likely tokens; 0 or -1 disables.
        top_p: keep the smallest set of tokens whose probability reaches top_p; 1 disables.
        seed: seed of the sampling generator (None: nondeterministic).
        stop_token_ids: tokens that end generation; None uses the model's end-of-sequence
            tokens.
        stop: strings that end generation; the text is cut before the first one.
        ignore_eos: keep generating through end-of-sequence tokens (benchmarks).
        presence_penalty: subtracted once from the logit of every token already generated
            (OpenAI's; in [-2, 2]).
        frequency_penalty: subtracted from each token's logit once per time it was already
            generated (OpenAI's; in [-2, 2]).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Check every field; raise :class:`InputError` naming the first bad one."""

        def bad(name: str, want: str, got) -> InputError:
            return InputError(f"{name} must be {want}, got {got!r}")

        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise bad("max_new_tokens", "an integer >= 1", self.max_new_tokens)
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise bad("temperature", "a finite number >= 0", self.temperature)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1 (or 0 / -1 to disable)", self.top_k)
        if (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not (0 < self.top_p <= 1)
        ):
            raise bad("top_p", "a number in (0, 1]", self.top_p)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                raise bad(name, "a number in [-2, 2]", v)
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63
        ):
            raise bad("seed", "an integer in [0, 2^63)", self.seed)
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                if (
                    isinstance(t, bool)
                    or not isinstance(t, int)
                    or t < 0
                    or (vocab_size is not None and t >= vocab_size)
                ):
                    raise bad("stop_token_ids", f"token ids in [0, {vocab_size})", t)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise bad("stop", "non-empty strings", s)
        return self


def sample(
    logits: Tensor,
    temperature: float | Sequence[float] = 0.0,
    top_k: int | Sequence[int] = -1,
    top_p: float | Sequence[float] = 1.0,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` (B, V); returns (B,) int64.

    Each parameter is one value for all rows or one per row. Rows with temperature below
    ``GREEDY_BELOW`` (0 included) are greedy (argmax of the raw logits). ``generator`` is one generator for the batch or one
    per row (None entries use the global generator).
    """
    B, V = logits.shape
    temps = _per_row(temperature, B)
    greedy = logits.argmax(dim=-1)
    is_greedy = [t < GREEDY_BELOW for t in temps]
    if all(is_greedy):
        return greedy
    dev = logits.device
    ks = [k if 0 < k < V else 0 for k in _per_row(top_k, B)]
    ps = _per_row(top_p, B)
    t = torch.tensor(
        [1.0 if g else x for x, g in zip(temps, is_greedy)], device=dev, dtype=torch.float32
    )
    x = logits.float() / t[:, None]  # (B, V)
    if any(ks):
        kmax = max(ks)
        top_vals = x.topk(kmax, dim=-1).values  # (B, kmax), descending
        kth = top_vals.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        use = torch.tensor([k > 0 for k in ks], device=dev)[:, None]
        x = torch.where(use & (x < kth), float("-inf"), x)
    if any(p < 1.0 for p in ps):
        sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_x.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
        p = torch.tensor(ps, device=dev, dtype=torch.float32)[:, None]
        drop_sorted = before >= p
        drop_sorted[:, 0] = False  # the most likely token stays, even if p rounds to 0
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    probs = x.softmax(dim=-1)
    # Clamp: a zero draw would turn 0/0 for a filtered token into NaN, which argmax picks.
    noise = _exponential(probs.shape, generator, dev).clamp_min_(1e-30)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(torch.tensor(is_greedy, device=dev), greedy, sampled)


def apply_penalties(
    logits: Tensor,
    output_ids: Sequence[Sequence[int]],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> Tensor:
    """OpenAI's penalties on ``logits`` (B, V): each row's logit of token j loses
    ``frequency * c_j + presence * (c_j > 0)``, c_j counting j in that row's generated
    tokens ``output_ids[row]`` (the prompt does not count). Returns ``logits`` itself when
    no row has a penalty, else a float32 copy."""
    rows = [i for i, (p, f) in enumerate(zip(presence, frequency)) if (p or f) and output_ids[i]]
    if not rows:
        return logits
    out = logits.float().clone()  # (B, V)
    V = out.shape[1]
    for i in rows:  # a few rows at most: only those that asked for a penalty
        ids = torch.as_tensor(output_ids[i], device=out.device)
        counts = torch.bincount(ids, minlength=V)[:V].to(out.dtype)  # (V,)
        out[i] -= frequency[i] * counts + presence[i] * (counts > 0).to(out.dtype)
    return out


def _per_row(v, B: int) -> list:
    if isinstance(v, (int, float)):
        return [v] * B
    v = list(v)
    if len(v) != B:
        raise ValueError(f"expected {B} per-row values, got {len(v)}")
    return v


def _exponential(shape, generator, device) -> Tensor:
    """Exp(1) noise (B, V) from one generator or one generator per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.empty(shape, device=device).exponential_(1.0, generator=generator)
    rows = [torch.empty(shape[1], device=device).exponential_(1.0, generator=g) for g in generator]
    return torch.stack(rows)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``seed``, or None (global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
