"""The OpenAI-compatible HTTP application over the engine (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the model ships a
chat template), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
:mod:`earlyexit.serve.server` runs it under uvicorn (``earlyexit serve``).

- Streaming with server-sent events (``stream: true``), ending with ``data: [DONE]``: at
  most one event per request per engine step, holding all the text that step completed
  (and more when the client fell behind); chunks are preformatted bytes.
- ``usage`` adds compute accounting: ``steps_run``, ``average_depth``,
  ``full_depth_fraction``.
- Per-request strategy: ``"strategy"``: ``full``, ``free`` (``exit_step``, ``threshold``
  a number or ``"adaptive"``, ``confidence``, ``deep_kv``), ``calm`` (the same options) or
  ``speculative`` (``exit_step``, ``draft_tokens``; greedy, lossless), all batched together
  by the engine (``ExitMode``); server defaults from the ``serve`` flags
  (``protocol.Defaults``), and ``--exit-vocab`` for every exit's head. ``usage`` adds what
  each request ran: layer steps, exits, drafted and accepted tokens.
- Errors are OpenAI-shaped JSON: 400 for bad input (:mod:`earlyexit.serve.protocol`), 401
  without the ``--api-key``, 404 for an unknown model, 413 for a body over the limit
  (refused before it is read in full), 503 with ``Retry-After`` when the queue is full or
  the engine has stopped, 500 when the engine step that ran the request failed (a stream
  gets an ``error`` event instead).
- ``/health`` answers 503 while the engine cannot serve (its thread stopped, or its last
  steps all failed) and 200 again once a step succeeds.
- A client that disconnects, streaming or not, has its request aborted at once, which
  frees its batch slot.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

try:  # FastAPI resolves handler annotations from module globals: import at module level
    from fastapi import Request
except ImportError:  # the [serve] extra is not installed; serve() says so
    Request = Any  # type: ignore[misc,assignment]

from earlyexit.decoding.speculative import make_gate
from earlyexit.engine import LLMEngine, QueueFull, StepFailed
from earlyexit.errors import InputError
from earlyexit.serve import protocol
from earlyexit.serve.engine_thread import EngineDead, EngineThread, output_usage
from earlyexit.serve.protocol import BadRequest, ChatTemplate, dumps


def _error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    headers=None,
):
    from fastapi.responses import Response

    body = dumps(_error_body(status, message, type_, param))
    return Response(body, status, headers=headers, media_type="application/json")


def _engine_error(e: BaseException):
    """The HTTP answer to an exception that came out of the engine thread."""
    if isinstance(e, QueueFull):
        return _error(503, str(e), "server_overloaded", headers={"Retry-After": "1"})
    if isinstance(e, InputError):  # an OptionError names the request field at fault
        return _error(400, str(e), param=getattr(e, "param", None))
    if isinstance(e, EngineDead):
        return _error(503, str(e), "server_error", headers={"Retry-After": "1"})
    if isinstance(e, StepFailed):
        return _error(500, str(e), "server_error")
    return _error(500, f"internal error: {type(e).__name__}", "server_error")


class _TooLarge(Exception):
    """A request body over the server's limit (413)."""


class _RequireKey:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY`` (compared in constant
    time). Plain ASGI rather than ``@app.middleware``, which would pipe every streamed
    chunk through an extra task and hide client disconnects."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error(401, "invalid or missing API key", "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Chunks:
    """One request's SSE events as bytes: the constant parts are encoded once, so each
    event costs two small JSON encodes (text, depths) and a join."""

    def __init__(self, cid: str, created: int, model: str, kind: str, n_steps: int) -> None:
        self.kind, self.n_steps = kind, n_steps
        self.obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.base = {"id": cid, "object": self.obj, "created": created, "model": model}
        head = dumps(self.base)[:-1]  # '{"id":..,"model":..' without the closing brace
        if kind == "chat":
            self.pre = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self.mid = b'},"finish_reason":null}],"depths":'
        else:
            self.pre = b"data: " + head + b',"choices":[{"index":0,"text":'
            self.mid = b',"logprobs":null,"finish_reason":null}],"depths":'

    def role(self) -> bytes:
        """Chat's first event: the assistant role."""
        delta = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
        return b"data: " + dumps({**self.base, "choices": [delta]}) + b"\n\n"

    def event(self, text: str, depths: list[int], last) -> bytes:
        """One event with ``text`` and its tokens' ``depths``; ``last``: the final
        RequestOutput when the request finished with this event (adds reason and usage)."""
        if last is None:
            return self.pre + dumps(text) + self.mid + dumps(depths) + b"}\n\n"
        reason = _finish(last.request)
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        payload = {
            **self.base,
            "choices": [choice],
            "depths": depths,
            "usage": output_usage(last.request, self.n_steps),
        }
        return b"data: " + dumps(payload) + b"\n\n"

    def usage(self, request) -> bytes:
        """``stream_options.include_usage``: a last event with no choices and the usage."""
        payload = {**self.base, "choices": [], "usage": output_usage(request, self.n_steps)}
        return b"data: " + dumps(payload) + b"\n\n"


def _text(o) -> str:
    if o.text is not None:
        return o.text
    return "".join(f"{t} " for t in o.new_token_ids)  # no tokenizer: the token ids


def build_app(
    lm,
    model_name: str,
    policy: str = "depthwise",
    max_batch: int = 32,
    max_len: int | None = None,
    max_queue: int = 1024,
    api_key: str | None = None,
    defaults: protocol.Defaults | None = None,
    chat_template: str | dict | None = None,
    max_body_bytes: int = 1 << 20,
    max_failed_steps: int = 3,
    exit_vocab=None,
    allow_untrained_exits: bool = False,
    draft_gate: str = "measured",
):
    """The FastAPI application serving ``lm`` (an ``earlyexit.LM``).

    ``draft_gate``: whether adaptive speculative rounds draft (``speculative.GATES``:
    ``measured`` by throughput per batch size, ``always``, ``never``).

    ``defaults``: what requests get for the fields they leave out (strategy, its options,
    temperature, max tokens; the ``serve`` flags). ``allow_untrained_exits``: serve lossy
    strategies on exits that were never trained (refused with a 400 otherwise).

    ``exit_vocab``: token ids the exits' head covers for requests that exit (a pruned exit
    head, ``LLMEngine``); None: the full vocabulary.

    ``chat_template``: a template (its source, or a ``tokenizer_config.json`` dict with its
    special tokens); default: the model's own (``lm.chat_config``).

    ``max_body_bytes`` caps a request body (413 beyond it, before it is read in full): a
    prompt that large cannot fit any context, and reading it would cost memory for nothing.
    ``max_failed_steps`` failed engine steps in a row make ``/health`` answer 503."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse, Response, StreamingResponse

    engine = LLMEngine(
        lm.model,
        lm.tokenizer,
        policy,
        max_batch,
        max_len,
        max_queue,
        exit_vocab=exit_vocab,
        allow_untrained_exits=allow_untrained_exits,
        draft_gate=make_gate(draft_gate),
    )
    defaults = defaults or protocol.Defaults()
    try:  # the default request must be one this model serves: refuse it now, not per request
        probe = {} if defaults.strategy == "speculative" else {"temperature": 0}
        params, mode = protocol.sampling(probe, defaults)
        engine.resolve_mode(mode, params)
    except (InputError, BadRequest) as e:
        raise InputError(f"the default strategy ({defaults.strategy}): {e}") from None
    engine.prepare_speculation()  # at start, not inside the first speculative request
    worker = EngineThread(engine, max_failed_steps)
    if isinstance(chat_template, str):
        chat_template = {"chat_template": chat_template}
    chat_config = chat_template if chat_template is not None else lm.chat_config
    template = ChatTemplate(chat_config) if chat_config else None
    L = lm.model.n_steps

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = FastAPI(title="earlyexit", version="0.1.0", lifespan=lifespan)
    app.state.worker = worker
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)

    def _json(obj, status: int = 200):
        return Response(dumps(obj), status, media_type="application/json")

    @app.get("/health")
    async def health():
        problem = worker.problem()
        if problem is None:
            return _json({"status": "ok"})
        return _json({"status": "error", "detail": problem}, 503)

    @app.get("/v1/models")
    async def models():
        return _json(
            {
                "object": "list",
                "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "earlyexit"}
                ],
            }
        )

    @app.get("/metrics")
    async def metrics():
        s = worker.snapshot()
        lines = [
            "# TYPE earlyexit_tokens_total counter",
            f"earlyexit_tokens_total {s['tokens_total']}",
            "# TYPE earlyexit_requests_total counter",
            f"earlyexit_requests_total {s['requests_total']}",
            "# TYPE earlyexit_engine_step_errors_total counter",
            f"earlyexit_engine_step_errors_total {s['step_errors_total']}",
            "# TYPE earlyexit_engine_healthy gauge",
            f"earlyexit_engine_healthy {int(s['healthy'])}",
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
        body = protocol.loads(bytes(raw))
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise LookupError(
                f"the model '{model}' does not exist; this server serves '{model_name}'"
            )
        return body

    async def _abort_on_disconnect(request: Request, rid: str) -> None:
        # The body has been read, so the next ASGI message is the client going away.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        worker.abort(rid)  # the engine ends the request's stream with an 'abort' output

    async def _respond(request: Request, kind: str):
        try:
            body = await _body(request)
            protocol.check_fields(body, kind)
            if kind == "chat":
                if template is None:
                    raise BadRequest(
                        "this model has no chat template; use /v1/completions", "messages"
                    )
                prompt = template.render(body)
            else:
                prompt = protocol.completion_prompt(body)
            params, exit = protocol.sampling(body, defaults)
            stream = protocol.get(body, "stream", bool, False, None, "true or false")
            opts = protocol.get(body, "stream_options", dict, {}, None, "an object")
            include_usage = protocol.get(opts, "include_usage", bool, False, None, "true or false")
            # a rendered chat already holds the template's special tokens
            rid, out = await worker.submit(prompt, params, exit, special_tokens=kind != "chat")
        except BadRequest as e:
            return _error(400, str(e), param=e.param)
        except _TooLarge as e:
            return _error(413, str(e))
        except LookupError as e:
            return _error(404, str(e), "not_found_error", "model")
        except RecursionError:
            return _error(400, "the request is nested too deeply")
        except (InputError, EngineDead) as e:
            return _engine_error(e)
        except Exception as e:  # a bug: answer this client, keep serving the others
            return _error(500, f"internal error: {type(e).__name__}", "server_error")

        created = int(time.time())
        cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        watch = asyncio.ensure_future(_abort_on_disconnect(request, rid))
        finished = handed_over = False
        try:
            first = await out.get()  # a full queue or a failed first step: an HTTP error
            if isinstance(first[0], BaseException):
                finished = True  # the engine has let it go already
                return _engine_error(first[0])
            if stream:
                chunks = _Chunks(cid, created, model_name, kind, L)
                handed_over = True  # the stream's generator owns the request from here
                return StreamingResponse(
                    _sse(first, out, rid, watch, chunks, include_usage),
                    media_type="text/event-stream",
                )
            items = first
            parts: list[str] = []
            while True:
                for o in items:
                    if isinstance(o, BaseException):
                        finished = True
                        return _engine_error(o)
                    parts.append(_text(o))
                last = items[-1]
                if last.finished:
                    finished = True
                    break
                items = await out.get()
        finally:
            if not handed_over:
                watch.cancel()
                if not finished:  # cancelled (shutdown, or a bug): let the request go
                    worker.abort(rid)
        req = last.request
        text = "".join(parts) if req.text is not None else " ".join(map(str, req.output_ids))
        choice = {"index": 0, "finish_reason": _finish(req), "logprobs": None}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice["text"] = text
            obj = "text_completion"
        return _json(
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

    async def _sse(first, out, rid, watch, chunks: _Chunks, include_usage: bool):
        finished = False
        try:
            if chunks.kind == "chat":
                yield chunks.role()
            items = first
            while True:
                # everything that arrived since the last event, in one event
                outs = [o for o in items if not isinstance(o, BaseException)]
                error = next((o for o in items if isinstance(o, BaseException)), None)
                if outs:
                    last = outs[-1]
                    text = "".join(_text(o) for o in outs)
                    depths = [d for o in outs for d in o.new_depths]
                    finished = last.finished
                    yield chunks.event(text, depths, last if finished else None)
                if error is not None:
                    finished = True  # the engine has let the request go already
                    yield _sse_error(error)
                    break
                if finished:
                    if include_usage:
                        yield chunks.usage(last.request)
                    break
                items = await out.get()
            yield b"data: [DONE]\n\n"
        finally:
            watch.cancel()
            if not finished:  # the client left early
                worker.abort(rid)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _respond(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _respond(request, "chat")

    return app


def _sse_error(e: BaseException) -> bytes:
    status = 503 if isinstance(e, (QueueFull, EngineDead)) else 500
    msg = str(e) if isinstance(e, (StepFailed, EngineDead, QueueFull)) else type(e).__name__
    return b"data: " + dumps(_error_body(status, msg, "server_error")) + b"\n\n"


def _finish(req) -> str | None:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(req.status.value)
