"""The OpenAI request schema: a request body in, (prompt, SamplingParams, ExitMode) out.

Pure Python, no web framework: every check here raises :class:`BadRequest` with one line
that names the field, and the server answers 400 with it.

- JSON through ``orjson`` when it is installed (the ``serve`` extra), else the standard
  library; a body nested too deeply for either is a 400, not a crash.
- Every field is read or refused: a field this server does not know is a 400 naming it,
  and so is a known OpenAI option it does not implement with a value that would change the
  answer (``logprobs: 5``). Nothing is silently ignored.
- ``presence_penalty`` / ``frequency_penalty`` are applied (OpenAI's definition).
- ``strategy`` (``full``, ``free``, ``calm``, ``speculative``) and its options
  (``exit_step``, ``threshold`` (a number or ``"adaptive"``), ``confidence``, ``deep_kv``,
  ``draft_tokens``): an option the chosen strategy does not read is a 400 naming it.
- Chat templates render in Jinja's immutable sandbox with Hugging Face's
  ``raise_exception``, whose message becomes the 400's (Llama-2 and Mistral templates
  raise on a bad role order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from earlyexit.decoding.confidence import DEFAULT_THRESHOLD
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.engine import ExitMode
from earlyexit.engine.request import DEEP_KV

try:  # the fast path: several times faster on SSE chunks and request bodies
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised by a test that hides it
    _orjson = None


class BadRequest(Exception):
    """A request the server answers with 400; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def dumps(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes (orjson when installed)."""
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


def loads(raw: bytes) -> Any:
    """Parse a request body; :class:`BadRequest` for anything that is not JSON."""
    try:
        return _orjson.loads(raw) if _orjson is not None else json.loads(raw)
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # orjson's JSONDecodeError is a ValueError
        raise BadRequest(f"the body is not valid JSON ({e.__class__.__name__})") from None


# Fields read by every request, by kind; anything else is refused with a 400 naming it.
_COMMON = {
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "strategy",
    "exit_step",
    "threshold",
    "deep_kv",
    "confidence",
    "draft_tokens",
    "stream_options",  # include_usage: a last event with the usage
    "user",  # an end-user id for the operator's logs; no effect on the answer (as OpenAI)
}
FIELDS = {
    "completion": _COMMON | {"prompt"},
    "chat": _COMMON | {"messages"},
}

# OpenAI options we do not implement, with the values that mean "not used"
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "echo": (None, False),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def check_fields(body: dict, kind: str) -> None:
    """Refuse fields this server would otherwise ignore."""
    for key, value in body.items():
        if key in FIELDS[kind]:
            continue
        if key in UNSUPPORTED:
            if value not in UNSUPPORTED[key]:
                raise BadRequest(f"'{key}' is not supported", key)
            continue
        raise BadRequest(f"'{key}' is not a field this server knows", str(key)[:64])


def get(body: dict, key: str, types, default=None, check=None, what: str = ""):
    """A field of the request body with a type check (bool is not a number here)."""
    if key not in body or body[key] is None:
        return default
    v = body[key]
    ok = isinstance(v, types) and not (
        isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    )
    if not ok or (check is not None and not check(v)):
        raise BadRequest(f"'{key}' must be {what}", key)
    return v


SERVED_STRATEGIES = ("full", "free", "calm", "speculative")
SERVED_MEASURES = ("margin", "max-prob", "classifier")
# which request fields each strategy reads (any other exit field is a 400 naming it)
STRATEGY_FIELDS = {
    "full": (),
    "free": ("exit_step", "threshold", "confidence", "deep_kv"),
    "calm": ("exit_step", "threshold", "confidence", "deep_kv"),
    "speculative": ("exit_step", "draft_tokens"),
}
EXIT_FIELDS = ("exit_step", "threshold", "confidence", "deep_kv", "draft_tokens")


def infer_strategy(given, default: str) -> str:
    """The strategy of a request (or of ``serve``'s defaults) that names none but gives the
    exit fields ``given``: ``default`` if it reads them all, else the one they belong to
    (``draft_tokens``: speculative; the others: free)."""
    given = set(given)
    if given <= set(STRATEGY_FIELDS[default]):
        return default
    return "speculative" if "draft_tokens" in given else "free"


@dataclass(frozen=True)
class Defaults:
    """What a request gets for the fields it leaves out: the ``serve`` flags.

    ``strategy`` is the default strategy; the other exit options apply to whichever
    strategy a request runs, where that strategy reads them (None: the model's own default,
    resolved by the engine). ``temperature`` is the sampling default (OpenAI's 1.0 unless
    ``serve --temperature``); a ``speculative`` request without one is greedy, the only
    temperature it serves."""

    strategy: str = "full"
    exit_step: int | None = None
    threshold: float | str | None = None
    confidence: str | None = None
    deep_kv: str | None = None
    draft_tokens: int | None = None
    temperature: float = 1.0
    max_tokens: int = 16


def sampling(
    body: dict, defaults: Defaults | None = None
) -> tuple[SamplingParams, ExitMode | None]:
    """The request's sampling parameters and adaptive-depth mode (None: full depth, or a
    Mixture-of-Recursions model's own routing). Types and value ranges are checked here;
    what depends on the model (an exit step within its depth, a classifier it has, exits
    that were trained) is checked by the engine, whose error names the field too."""
    d = defaults or Defaults()
    if get(body, "n", int, 1, lambda v: v >= 1, "a positive integer") != 1:
        raise BadRequest("only n = 1 is supported", "n")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 8:
        stop = tuple(stop)
    else:
        raise BadRequest("'stop' must be a string or a list of at most 8 strings", "stop")
    if any(not s for s in stop):
        raise BadRequest("'stop' strings must not be empty", "stop")
    strategy = get(
        body,
        "strategy",
        str,
        None,
        lambda v: v in SERVED_STRATEGIES,
        " or ".join(f"'{x}'" for x in SERVED_STRATEGIES),
    )
    given = [k for k in EXIT_FIELDS if body.get(k) is not None]
    if strategy is None:
        strategy = infer_strategy(given, d.strategy)
    for k in given:
        if k not in STRATEGY_FIELDS[strategy]:
            users = [s for s, f in STRATEGY_FIELDS.items() if k in f]
            raise BadRequest(
                f"'{k}' applies to strategy {' or '.join(repr(u) for u in users)}, not "
                f"{strategy!r}",
                k,
            )
    positive = (lambda v: v >= 1, "a positive integer")
    max_tokens = get(body, "max_tokens", int, None, *positive)
    if max_tokens is None:
        max_tokens = get(body, "max_completion_tokens", int, d.max_tokens, *positive)
    t_default = 0.0 if strategy == "speculative" else d.temperature
    temperature = get(
        body, "temperature", (int, float), t_default, lambda v: 0 <= v <= 2, "a number in [0, 2]"
    )
    top_p = get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = get(body, "top_k", int, -1, lambda v: v >= -1, "an integer >= -1")
    seed = get(body, "seed", int, None, lambda v: 0 <= v < 2**63, "a non-negative integer")
    penalty = (lambda v: -2 <= v <= 2, "a number in [-2, 2]")
    presence = get(body, "presence_penalty", (int, float), 0.0, *penalty)
    frequency = get(body, "frequency_penalty", (int, float), 0.0, *penalty)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=float(top_p),
        seed=seed,
        stop=stop,
        ignore_eos=get(body, "ignore_eos", bool, False, None, "true or false"),
        presence_penalty=float(presence),
        frequency_penalty=float(frequency),
    )
    if strategy == "full":
        return params, None
    step = get(body, "exit_step", int, d.exit_step, lambda v: v >= 1, "a positive integer")
    threshold = get(
        body,
        "threshold",
        (int, float, str),
        d.threshold,
        lambda v: v == "adaptive" if isinstance(v, str) else -1 <= v <= 1,
        "a number in [-1, 1] or 'adaptive'",
    )
    measure = get(
        body,
        "confidence",
        str,
        d.confidence or "margin",
        lambda v: v in SERVED_MEASURES,
        " or ".join(f"'{x}'" for x in SERVED_MEASURES),
    )
    deep_kv = get(
        body,
        "deep_kv",
        str,
        d.deep_kv,
        lambda v: v in DEEP_KV,
        " or ".join(f"'{k}'" for k in DEEP_KV),
    )
    draft_k = get(
        body,
        "draft_tokens",
        int,
        d.draft_tokens,
        lambda v: 1 <= v <= 32,
        "an integer in [1, 32]",
    )
    if strategy == "speculative":
        return params, ExitMode(step, strategy="speculative", draft_k=draft_k)
    if strategy == "calm" and threshold == "adaptive":
        raise BadRequest("an adaptive threshold is FREE's; calm takes a number", "threshold")
    return params, ExitMode(
        step,
        DEFAULT_THRESHOLD if threshold is None else threshold,
        deep_kv,
        strategy=strategy,
        measure=measure,
    )


def completion_prompt(body: dict) -> str | list[int]:
    """The prompt of a ``/v1/completions`` body: text or token ids, one per request."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("'prompt' is empty", "prompt")
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise BadRequest(
        "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
        "prompt",
    )


class ChatTemplate:
    """A model's chat template for ``/v1/chat/completions`` (:class:`earlyexit.chat.ChatTemplate`,
    compiled once); messages that do not fit it are a 400 naming ``messages``."""

    def __init__(self, config: dict) -> None:
        from earlyexit.chat import ChatTemplate as _Template

        self._template = _Template(config)

    def render(self, body: dict) -> str:
        """The prompt text of a ``/v1/chat/completions`` body."""
        from earlyexit.chat import ChatTemplateError

        try:
            return self._template.render(body.get("messages"))
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages") from None
