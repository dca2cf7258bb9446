"""lm-evaluation-harness adapter: evaluate any earlyexit model under any decoding strategy.

    earlyexit eval lm-eval --model DIR --strategy free --threshold 0.3 --tasks hellaswag
    lm_eval --model earlyexit --model_args pretrained=DIR,strategy=free,threshold=0.3 ...

Registered as the lm-eval model ``earlyexit`` (importing this module registers it).
``loglikelihood`` scores each continuation with the strategy's own logits (teacher-forced
decoding, ``scoring.py``); ``generate_until`` generates with the strategy and cuts at the
task's stop strings; ``loglikelihood_rolling`` scores a document in windows of the model's
context. Needs ``pip install 'earlyexit[eval]'``.
"""

from __future__ import annotations

from earlyexit.errors import EarlyExitError, InputError

try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model
except ImportError:  # the adapter is optional; the CLI explains how to install it
    _LMBase = object

    def register_model(*names):
        return lambda cls: cls


STRATEGY_KEYS = (
    "exit_step",
    "threshold",
    "adaptive",
    "measure",
    "min_exit",
    "decay_tau",
    "draft_k",
    "compile",
    "allow_untrained",  # lossy strategies on exits that were never trained
)


def _coerce(v):
    if not isinstance(v, str):
        return v
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for f in (int, float):
        try:
            return f(v)
        except ValueError:
            pass
    return v


@register_model("earlyexit")
class EarlyExitLM(_LMBase):
    """An earlyexit checkpoint (or Hugging Face directory) as an lm-eval model.

    Args:
        pretrained: model directory.
        strategy: ``full``, ``static``, ``calm``, ``free`` or ``speculative``.
        device, dtype: as everywhere else.
        max_gen_toks: default generation length when a task does not set one.
        **options: strategy options (``exit_step``, ``threshold``, ``adaptive``, ...).
    """

    def __init__(
        self,
        pretrained: str,
        strategy: str = "full",
        device: str = "cpu",
        dtype=None,
        max_gen_toks: int = 256,
        batch_size=1,
        **options,
    ) -> None:
        if _LMBase is object:
            raise EarlyExitError("the lm-eval adapter needs lm-eval: pip install 'earlyexit[eval]'")
        super().__init__()
        import earlyexit
        from earlyexit.decoding.strategies import make_strategy

        unknown = set(options) - set(STRATEGY_KEYS)
        if unknown:
            raise InputError(
                f"unknown model_args {sorted(unknown)}; strategy options: {', '.join(STRATEGY_KEYS)}"
            )
        self.lm = earlyexit.load(pretrained, device=device, dtype=dtype)
        if self.lm.tokenizer is None:
            raise InputError(f"{pretrained}: lm-eval needs a tokenizer next to the model")
        self.strategy_name = strategy
        self.options = {k: _coerce(v) for k, v in options.items()}
        self._make = lambda: make_strategy(self.lm.model, strategy, **self.options)
        self._make()  # validate the options now, not on the first request
        self.max_gen_toks = int(max_gen_toks)
        self.depths: list[int] = []  # every scored or generated token's depth (reports)

    @property
    def max_length(self) -> int:
        return self.lm.config.max_context

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces belong to the continuation (as lm-eval's HF model does)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        tok = self.lm.tokenizer
        whole = tok.encode(context + continuation, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False)
        if not ctx:  # an empty context: condition on end-of-text, as the training data does
            eot = (self.lm.config.eos_token_ids or [0])[0]
            return [eot], whole
        return whole[: len(ctx)], whole[len(ctx) :]

    def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        from earlyexit.evaluation.scoring import score

        room = self.max_length - len(cont)
        if room < 1:
            raise InputError(f"a continuation of {len(cont)} tokens does not fit the context")
        total, greedy, depths = score(self.lm.model, self._make(), ctx[-room:], cont)
        self.depths += depths
        return total, greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            out.append(self._score(ctx, cont) if cont else (0.0, True))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        eot = (self.lm.config.eos_token_ids or [0])[0]
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.lm.tokenizer.encode(text, add_special_tokens=False)
            total, prev, win = 0.0, [eot], self.max_length - 1
            for i in range(0, len(ids), win):
                chunk = ids[i : i + win]
                total += self._score(prev[-(self.max_length - len(chunk)) :], chunk)[0]
                prev = prev + chunk
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from earlyexit.decoding.sampling import SamplingParams

        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            n = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = (
                float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            )
            ids = self.lm.encode(context)
            n = max(1, min(n, self.max_length - 1))
            ids = ids[-(self.max_length - n) :]
            params = SamplingParams(max_new_tokens=n, temperature=temperature, stop=tuple(until))
            res = self.lm.generate(ids, params, strategy=self._make())
            self.depths += res.depths
            out.append(res.text or "")
        return out
