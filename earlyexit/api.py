"""The public Python API: load a model, generate. The CLI is built on exactly these calls.

>>> import earlyexit
>>> lm = earlyexit.load("checkpoints/tiny")          # ours, or a Hugging Face directory
>>> out = lm.generate("def main(", max_new_tokens=32)
>>> out.text, out.token_ids, out.depths              # depth = plan steps each token ran
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from earlyexit.decoding.base import Strategy
from earlyexit.decoding.generate import GenerationResult, TokenEvent
from earlyexit.decoding.generate import generate as _generate
from earlyexit.decoding.generate import stream as _stream
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import make_strategy
from earlyexit.device import resolve_device, resolve_dtype
from earlyexit.errors import InputError
from earlyexit.io.checkpoint import CONFIG, load_checkpoint
from earlyexit.models.decoder import Decoder
from earlyexit.tokenizer import Tokenizer

Prompt = str | Sequence[int]

SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
STRATEGY_OPTIONS = {
    name
    for name, p in inspect.signature(make_strategy).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}


class LM:
    """A loaded model with its tokenizer (and chat template, if it has one), ready to generate."""

    def __init__(
        self, model: Decoder, tokenizer: Tokenizer | None = None, chat_config: dict | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chat_config = chat_config  # tokenizer_config.json: chat_template, special tokens

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` ([{role, content}, ...]) under the model's own chat
        template; the template writes the special tokens, so the tokenizer adds none."""
        from earlyexit.chat import render

        text = render(self.chat_config, messages, add_generation_prompt)
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer.json; chat needs one")
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def config(self):
        return self.model.config

    def encode(self, prompt: Prompt) -> list[int]:
        """Text through the tokenizer, or token ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("this model has no tokenizer.json; pass token ids instead of text")
            if not prompt:
                raise InputError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _params(self, params: SamplingParams | None, kwargs: dict) -> SamplingParams:
        if params is not None and kwargs:
            raise InputError(
                f"pass either params=SamplingParams(...) or sampling keywords, not both "
                f"(got {', '.join(sorted(kwargs))})"
            )
        return params if params is not None else SamplingParams(**kwargs)

    def _split(self, strategy, kwargs: dict) -> tuple[Strategy | None, dict]:
        """Keyword arguments are sampling fields or strategy options (``threshold=0.3``
        with ``strategy="free"``); returns the strategy and the sampling keywords."""
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in STRATEGY_OPTIONS}
        unknown = sorted(set(kwargs) - SAMPLING_FIELDS)
        if unknown:
            raise InputError(
                f"unknown keyword(s) {', '.join(unknown)}; sampling: "
                f"{', '.join(sorted(SAMPLING_FIELDS))}; strategy options: "
                f"{', '.join(sorted(STRATEGY_OPTIONS))}"
            )
        if options and not isinstance(strategy, str):
            raise InputError(
                f"strategy options ({', '.join(sorted(options))}) need a strategy name, e.g. "
                f"strategy='free', or build the strategy with lm.strategy(name, **options)"
            )
        if isinstance(strategy, str):
            strategy = self.strategy(strategy, **options)
        return strategy, kwargs

    def strategy(self, name: str = "full", **options) -> Strategy:
        """A decoding strategy for this model (``full``, ``static``, ``calm``, ``free``,
        ``speculative``); options as in :func:`earlyexit.decoding.strategies.make_strategy`.
        Reuse the object across calls to keep state (FREE's adaptive threshold)."""
        return make_strategy(self.model, name, **options)

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        strategy: Strategy | str | None = None,
        **kwargs,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (text or ids) or a list of prompts (batched).

        Keyword arguments are :class:`SamplingParams` fields (``max_new_tokens``,
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``, ...) or, with a strategy
        given by name, its options (``lm.generate(p, strategy="free", threshold=0.3)``).
        ``strategy`` is a :class:`Strategy` (see :meth:`strategy`) or a name.
        """
        single, prompts = _as_batch(prompt)
        ids = [self.encode(p) for p in prompts]
        strategy, kwargs = self._split(strategy, kwargs)
        out = _generate(self.model, ids, self._params(params, kwargs), self.tokenizer, strategy)
        return out[0] if single else out

    def stream(
        self,
        prompt: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        strategy: Strategy | str | None = None,
        **kwargs,
    ) -> Iterator[TokenEvent]:
        """Yield :class:`TokenEvent` s as tokens are generated (keywords as in :meth:`generate`)."""
        _, prompts = _as_batch(prompt)
        ids = [self.encode(p) for p in prompts]
        strategy, kwargs = self._split(strategy, kwargs)
        return _stream(self.model, ids, self._params(params, kwargs), self.tokenizer, strategy)


def _as_batch(prompt) -> tuple[bool, list]:
    if isinstance(prompt, str):
        return True, [prompt]
    prompt = list(prompt)
    if prompt and all(isinstance(t, int) for t in prompt):
        return True, [prompt]
    return False, prompt


def load(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    draft: str | Path | None = "auto",
) -> LM:
    """Load an earlyexit checkpoint, a Hugging Face Llama/Mistral/Qwen2 directory, a GGUF
    file, or a named model (``smollm2``: see :mod:`earlyexit.io.registry`).

    Args:
        path: checkpoint directory (``config.json`` + ``model.safetensors`` [+ ``tokenizer.json``]
            [+ ``tokenizer_config.json`` with a chat template]), ``MODEL.gguf``, or a name.
        device: ``cpu``, ``cuda[:N]`` or ``auto``.
        dtype: ``float32``, ``bfloat16``, ``float16``, ``auto`` (bfloat16 where the hardware
            runs it natively, float32 elsewhere: the CLI's default) or None (as stored).
        draft: a draft directory (``earlyexit train-draft``) to attach for ``speculative``
            decoding; ``"auto"``: the draft shipped for a named model, if any; None: none.
    """
    lm = _load(path, device, dtype)
    auto = draft == "auto"
    if auto:
        from earlyexit.drafts import shipped_draft
        from earlyexit.io.registry import NAMED

        draft = shipped_draft(str(path)) if str(path) in NAMED and not Path(path).exists() else None
    if draft is not None:
        from earlyexit.drafts import attach
        from earlyexit.errors import CheckpointError

        try:
            lm.model = attach(lm.model, draft)
        except CheckpointError as e:
            if not auto:
                raise
            import warnings

            # the shipped draft does not fit this copy of the model: everything but
            # speculation from it still works, so say why and go on without it
            warnings.warn(f"the shipped draft was not attached: {e}", stacklevel=2)
    return lm


def _load(path: str | Path, device, dtype) -> LM:
    from earlyexit.chat import load_chat_config
    from earlyexit.io.gguf import is_gguf
    from earlyexit.io.registry import resolve_model

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = resolve_model(path)
    if is_gguf(path):
        from earlyexit.io.gguf import load_gguf

        model, tok, tok_cfg = load_gguf(path, dev, dt)
        return LM(model, tok, tok_cfg if "chat_template" in tok_cfg else None)
    if _is_hf_dir(path):
        from earlyexit.io.hf import load_hf

        model, tok = load_hf(path, dev, dt)
    else:
        model, tok = load_checkpoint(path, dev, dt)
    return LM(model, tok, load_chat_config(path))


def _is_hf_dir(path: Path) -> bool:
    try:
        cfg = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "format_version" not in cfg and "model_type" in cfg


def generate(model: LM | str | Path, prompt: Prompt | Sequence[Prompt], **kwargs):
    """One-shot convenience: ``earlyexit.generate("DIR", "def main(", max_new_tokens=32)``."""
    lm = model if isinstance(model, LM) else load(model)
    return lm.generate(prompt, **kwargs)
