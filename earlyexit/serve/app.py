"""``earlyexit serve``: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the model ships a
chat template), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

- Streaming with server-sent events (``stream: true``), ending with ``data: [DONE]``.
- ``usage`` adds compute accounting: ``steps_run``, ``average_depth``,
  ``full_depth_fraction``.
- Per-request early exit: ``"strategy": "free"`` with ``"exit_step"`` and ``"threshold"``
  (server defaults from ``--strategy`` / ``--exit-step`` / ``--threshold``).
- Errors are OpenAI-shaped JSON: 400 for bad input (malformed JSON, wrong types, empty or
  over-long prompts, n > 1, unsupported options), 401 without the ``--api-key``, 404 for
  an unknown model, 503 with ``Retry-After`` when the queue is full.
- A client that disconnects has its request aborted, which frees its slot.
- Binds to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any

try:  # FastAPI resolves handler annotations from module globals: import at module level
    from fastapi import Request
except ImportError:  # the [serve] extra is not installed; serve() says so
    Request = Any  # type: ignore[misc,assignment]

from earlyexit.decoding.sampling import SamplingParams
from earlyexit.engine import ExitMode, LLMEngine, QueueFull
from earlyexit.errors import EarlyExitError, InputError
from earlyexit.serve.engine_thread import EngineThread, output_usage


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    headers=None,
):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _TooLarge(Exception):
    """A request body over the server's limit (413)."""


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _get(body: dict, key: str, types, default=None, check=None, what: str = ""):
    """A field of the request body with a type check (bool is not a number here)."""
    if key not in body or body[key] is None:
        return default
    v = body[key]
    ok = isinstance(v, types) and not (
        isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    )
    if not ok or (check is not None and not check(v)):
        raise _BadRequest(f"'{key}' must be {what}", key)
    return v


def build_app(
    lm,
    model_name: str,
    policy: str = "depthwise",
    max_batch: int = 32,
    max_len: int | None = None,
    max_queue: int = 1024,
    api_key: str | None = None,
    default_exit: ExitMode | None = None,
    max_tokens_default: int = 16,
    chat_template: str | None = None,
    max_body_bytes: int = 1 << 20,
):
    """The FastAPI application serving ``lm`` (an ``earlyexit.LM``).

    ``max_body_bytes`` caps a request body (413 beyond it, before it is read in full): a
    prompt that large cannot fit any context, and reading it would cost memory for nothing."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    engine = LLMEngine(lm.model, lm.tokenizer, policy, max_batch, max_len, max_queue)
    worker = EngineThread(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="earlyexit", version="0.1.0", lifespan=lifespan)
    app.state.worker = worker
    L = lm.model.n_steps

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()[:1]}")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "earlyexit"}],
        }

    @app.get("/metrics")
    def metrics():
        s = worker.snapshot()
        lines = [
            "# TYPE earlyexit_tokens_total counter",
            f"earlyexit_tokens_total {s['tokens_total']}",
            "# TYPE earlyexit_requests_total counter",
            f"earlyexit_requests_total {s['requests_total']}",
            "# TYPE earlyexit_tokens_per_second gauge",
            f"earlyexit_tokens_per_second {worker.tokens_per_second():.3f}",
            "# TYPE earlyexit_queue_depth gauge",
            f"earlyexit_queue_depth {s['waiting']}",
            "# TYPE earlyexit_running_requests gauge",
            f"earlyexit_running_requests {s['running']}",
            "# TYPE earlyexit_batch_occupancy gauge",
            f"earlyexit_batch_occupancy {s['mean_rows_per_block_call'] / s['max_batch']:.4f}",
            "# TYPE earlyexit_block_calls_total counter",
            f"earlyexit_block_calls_total {s['block_calls_total']}",
            "# TYPE earlyexit_token_depth histogram",
        ]
        cum = 0
        for d in range(1, s["n_steps"] + 1):
            cum += s["depth_histogram"].get(d, 0)
            lines.append(f'earlyexit_token_depth_bucket{{le="{d}"}} {cum}')
        lines.append(f'earlyexit_token_depth_bucket{{le="+Inf"}} {cum}')
        lines.append(f"earlyexit_token_depth_count {cum}")
        lines.append(
            f"earlyexit_token_depth_sum {sum(d * c for d, c in s['depth_histogram'].items())}"
        )
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _TooLarge(f"the body has {declared} bytes; the limit is {max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise _TooLarge(f"the body exceeds the limit of {max_body_bytes} bytes")
        try:
            body = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError) as e:
            raise _BadRequest(f"the body is not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(body, dict):
            raise _BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise LookupError(
                f"the model '{model}' does not exist; this server serves '{model_name}'"
            )
        return body

    def _params(body: dict) -> tuple[SamplingParams, ExitMode | None]:
        if _get(body, "n", int, 1, lambda v: v >= 1, "a positive integer") != 1:
            raise _BadRequest("only n = 1 is supported", "n")
        for key, harmless in _UNSUPPORTED.items():
            if key in body and body[key] not in harmless:
                raise _BadRequest(f"'{key}' is not supported", key)
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 8:
            stop = tuple(stop)
        else:
            raise _BadRequest("'stop' must be a string or a list of at most 8 strings", "stop")
        max_tokens = _get(body, "max_tokens", int, None, lambda v: v >= 1, "a positive integer")
        if max_tokens is None:
            max_tokens = _get(
                body,
                "max_completion_tokens",
                int,
                max_tokens_default,
                lambda v: v >= 1,
                "a positive integer",
            )
        temperature = _get(
            body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]"
        )
        top_p = _get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
        top_k = _get(body, "top_k", int, -1, lambda v: v >= -1, "an integer >= -1")
        seed = _get(body, "seed", int, None, lambda v: 0 <= v < 2**63, "a non-negative integer")
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=float(temperature),
            top_k=top_k,
            top_p=float(top_p),
            seed=seed,
            stop=stop,
        )
        strategy = _get(
            body, "strategy", str, None, lambda v: v in ("full", "free"), "'full' or 'free'"
        )
        exit = default_exit
        if strategy == "full":
            exit = None
        elif strategy == "free" or "threshold" in body or "exit_step" in body:
            base = default_exit or (
                ExitMode(lm.config.exits.steps[0]) if lm.config.exits.steps else None
            )
            step = _get(
                body,
                "exit_step",
                int,
                base.step if base else None,
                lambda v: 1 <= v < L,
                f"an integer in [1, {L - 1}]",
            )
            if step is None:
                raise _BadRequest("this model has no exit points; pass 'exit_step'", "exit_step")
            thr = _get(
                body,
                "threshold",
                (int, float),
                base.threshold if base else 0.9,
                lambda v: -1 <= v <= 1,
                "a number in [-1, 1]",
            )
            exit = ExitMode(step, float(thr))
        return params, exit

    async def _run(prompt, params, exit, request: Request):
        """Submit and yield outputs; abort when the client goes away."""
        rid, q = worker.submit(prompt, params, exit)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine failure: {item!r}")
                yield item
                if item.finished:
                    return
        finally:
            req = worker.engine.requests.get(rid)
            if req is not None and not req.finished:
                worker.abort(rid)

    def _completion_prompt(body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise _BadRequest("'prompt' is empty", "prompt")
            return prompt
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return prompt
        raise _BadRequest(
            "'prompt' must be a non-empty string or a list of token ids (one prompt per request)",
            "prompt",
        )

    async def _respond(request: Request, kind: str):
        try:
            body = await _body(request)
            if kind == "chat":
                prompt = _chat_prompt(body, chat_template)
            else:
                prompt = _completion_prompt(body)
            params, exit = _params(body)
            stream = _get(body, "stream", bool, False, None, "true or false")
            created = int(time.time())
            cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
            gen = _run(prompt, params, exit, request)
            first = await gen.__anext__()  # surfaces InputError / QueueFull before a 200
        except _BadRequest as e:
            return _error(400, str(e), param=e.param)
        except _TooLarge as e:
            return _error(413, str(e))
        except LookupError as e:
            return _error(404, str(e), "not_found_error", "model")
        except QueueFull as e:
            return _error(503, str(e), "server_overloaded", headers={"Retry-After": "1"})
        except InputError as e:
            return _error(400, str(e))
        except EarlyExitError as e:
            return _error(500, str(e), "server_error")
        except Exception as e:  # a bug: answer this client, keep serving the others
            return _error(500, f"internal error: {type(e).__name__}", "server_error")
        if stream:
            return StreamingResponse(
                _sse(first, gen, cid, created, kind), media_type="text/event-stream"
            )
        text_parts, last = [], first
        text_parts.append(first.text or "")
        async for out in gen:
            text_parts.append(out.text or "")
            last = out
        req = last.request
        text = (
            "".join(text_parts) if lm.tokenizer is not None else " ".join(map(str, req.output_ids))
        )
        choice = {"index": 0, "finish_reason": _finish(req), "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice["text"] = text
            obj = "text_completion"
        return JSONResponse(
            {
                "id": cid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": [choice],
                "usage": output_usage(req, L),
                "depths": req.depths,
            }
        )

    async def _sse(first, gen, cid, created, kind):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(out) -> str:
            text = out.text if out.text is not None else " ".join(map(str, out.new_token_ids)) + " "
            if kind == "chat":
                choice = {
                    "index": 0,
                    "delta": {"content": text},
                    "finish_reason": _finish(out.request) if out.finished else None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": _finish(out.request) if out.finished else None,
                }
            payload = {
                "id": cid,
                "object": obj,
                "created": created,
                "model": model_name,
                "choices": [choice],
                "depths": out.new_depths,
            }
            if out.finished:
                payload["usage"] = output_usage(out.request, L)
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if kind == "chat":
                head = {
                    "id": cid,
                    "object": obj,
                    "created": created,
                    "model": model_name,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                    ],
                }
                yield f"data: {json.dumps(head)}\n\n"
            yield chunk(first)
            async for out in gen:
                yield chunk(out)
            yield "data: [DONE]\n\n"
        finally:
            await gen.aclose()  # aborts the request if the client left early

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _respond(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _respond(request, "chat")

    return app


# OpenAI options we do not implement, with the values that mean "not used"
_UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "echo": (None, False),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


def _finish(req) -> str | None:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(req.status.value)


def _chat_prompt(body: dict, template: str | None) -> str:
    if template is None:
        raise _BadRequest("this model has no chat template; use /v1/completions", "messages")
    msgs = body.get("messages")
    if (
        not isinstance(msgs, list)
        or not msgs
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
    ):
        raise _BadRequest(
            "'messages' must be a non-empty list of {role, content} objects", "messages"
        )
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=msgs, add_generation_prompt=True, bos_token="", eos_token=""
    )


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: str = "depthwise",
    max_batch: int = 32,
    max_len: int | None = None,
    max_queue: int = 1024,
    api_key: str | None = None,
    exit_step: int | None = None,
    threshold: float | None = None,
    device: str = "auto",
    dtype: str | None = None,
    name: str | None = None,
) -> None:
    """Load ``model`` and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise EarlyExitError(
            "the server needs FastAPI and uvicorn: pip install 'earlyexit[serve]'"
        ) from None
    import earlyexit

    lm = earlyexit.load(model, device=device, dtype=dtype)
    default_exit = None
    if threshold is not None or exit_step is not None:
        step = exit_step or (lm.config.exits.steps[0] if lm.config.exits.steps else None)
        if step is None:
            raise InputError("--threshold needs --exit-step: this model has no exit points")
        default_exit = ExitMode(step, 0.9 if threshold is None else threshold)
    from pathlib import Path

    app = build_app(
        lm,
        name or Path(model).name,
        policy,
        max_batch,
        max_len,
        max_queue,
        api_key,
        default_exit,
        chat_template=load_chat_template(model),
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def load_chat_template(model_dir: str) -> str | None:
    """The ``chat_template`` of a model directory's ``tokenizer_config.json``, if any."""
    from pathlib import Path

    path = Path(model_dir) / "tokenizer_config.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    t = data.get("chat_template")
    return t if isinstance(t, str) else None
