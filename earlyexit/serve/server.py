"""``earlyexit serve``: the app under uvicorn, with the limits a public endpoint needs.

- **Open connections are bounded** (``limit_concurrency``): one more is answered 503 with
  ``Retry-After`` and closed at once, so idle sockets cannot exhaust file descriptors.
- **A connection must deliver a complete request within** ``request_timeout`` seconds of
  opening (or of its previous response): half-sent requests and bodies (slowloris) are
  closed. A request being answered is not limited: generation takes as long as it takes.
- **Shutdown has a deadline**: on SIGTERM / SIGINT the server stops accepting, lets
  requests in flight finish for ``shutdown_timeout`` seconds, then aborts what is left (each
  client gets its request's end, ``finish_reason: "abort"``), closes what still hangs and
  exits; SIGTERM exits 0.
- Once it listens it prints one line to stderr: address, model, policy, max batch.
- uvicorn uses ``uvloop`` and ``httptools`` when they are installed (the event loop and
  the HTTP parser then run in C); the plain asyncio loop and ``h11`` otherwise.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from pathlib import Path

from earlyexit.errors import EarlyExitError, InputError

_BUSY_BODY = json.dumps(
    {
        "error": {
            "message": "too many open connections; retry later",
            "type": "server_overloaded",
            "param": None,
            "code": 503,
        }
    }
).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


def guarded_protocol(base: type, max_connections: int, request_timeout: float) -> type:
    """uvicorn's HTTP protocol class ``base`` with a bound on open connections and a
    deadline for receiving each request (uvicorn has neither: its keep-alive timeout
    starts only after a response)."""

    class Guarded(base):  # type: ignore[misc,valid-type]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(_BUSY)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(request_timeout, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            c = self.cycle
            # no request yet, the previous one answered, or this one's body still coming
            if c is None or c.response_complete or c.more_body:
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this kept-alive connection

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def default_connection_limit(max_batch: int, max_queue: int) -> int:
    """Enough connections for a full batch, a full queue and a few probes, and safely under
    the process's open-file limit."""
    want = max_batch + max_queue + 32
    try:
        import resource  # Unix only
    except ImportError:
        return want
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return want
    return max(16, min(want, soft - 64))


def make_server(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_timeout: float = 30.0,
    limit_concurrency: int | None = None,
    request_timeout: float = 30.0,
    banner: str | None = None,
    log_level: str = "warning",
):
    """A configured ``uvicorn.Server`` for ``app`` (from :func:`build_app`): run it with
    ``.run()`` (blocking) or ``await .serve()``. ``port`` 0 picks a free port; the banner
    line and :func:`bound_port` tell which."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    worker = app.state.worker
    if limit_concurrency is None:
        limit_concurrency = default_connection_limit(
            worker.engine.scheduler.max_batch, worker.engine.max_queue
        )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(AutoHTTPProtocol, limit_concurrency, request_timeout),
        # after the deadline the app aborts its requests; these 2 s let them send their
        # final chunk, then uvicorn cancels whatever still hangs (a half-sent body)
        timeout_graceful_shutdown=shutdown_timeout + 2.0,
    )

    class Server(uvicorn.Server):
        ready = threading.Event()  # set once it listens (in-process users wait on it)
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                self.loop = asyncio.get_running_loop()
                if banner is not None:
                    print(
                        f"earlyexit serve: listening on http://{_address(self)}, {banner}",
                        file=sys.stderr,
                        flush=True,
                    )
                self.ready.set()

        async def shutdown(self, sockets=None) -> None:
            deadline = asyncio.get_running_loop().call_later(shutdown_timeout, worker.abort_all)
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    return Server(config)


def bound_port(server) -> int:
    """The port a started server listens on."""
    return server.servers[0].sockets[0].getsockname()[1]


def _address(server) -> str:
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def model_name(model: str) -> str:
    """The model id clients see by default: the run's name for a run's ``RUN/final``
    directory, else the directory's (or hub name's) last part."""
    p = Path(model.rstrip("/"))
    if p.name == "final" and p.parent.name:
        return p.parent.name
    return p.name or model


def served_defaults(
    strategy: str | None,
    exit_step: int | None,
    threshold: float | str | None,
    confidence: str | None,
    deep_kv: str | None,
    draft_tokens: int | None,
    temperature: float,
    shutdown_timeout: float,
    request_timeout: float,
    limit_concurrency: int | None,
):
    """Check the server's own flags and return the request defaults they make
    (``protocol.Defaults``; ``strategy`` None is ``full`` or the strategy the exit options
    given belong to). One place for ``serve`` and ``serve --replicas``."""
    from earlyexit.serve.protocol import Defaults, infer_strategy

    for flag, v in (
        ("--shutdown-timeout", shutdown_timeout),
        ("--request-timeout", request_timeout),
    ):
        if not v > 0:
            raise InputError(f"{flag} must be a positive number of seconds, got {v}")
    if limit_concurrency is not None and limit_concurrency < 1:
        raise InputError(f"--limit-concurrency must be >= 1, got {limit_concurrency}")
    if not 0 <= temperature <= 2:
        raise InputError(f"--temperature must be within [0, 2], got {temperature}")
    if strategy is None:
        flags = {
            "exit_step": exit_step,
            "threshold": threshold,
            "confidence": confidence,
            "deep_kv": deep_kv,
            "draft_tokens": draft_tokens,
        }
        strategy = infer_strategy([k for k, v in flags.items() if v is not None], "full")
    return Defaults(strategy, exit_step, threshold, confidence, deep_kv, draft_tokens, temperature)


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
    threshold: float | str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    name: str | None = None,
    shutdown_timeout: float = 30.0,
    limit_concurrency: int | None = None,
    request_timeout: float = 30.0,
    exit_vocab=None,
    deep_kv: str | None = None,
    strategy: str | None = None,
    confidence: str | None = None,
    draft_tokens: int | None = None,
    draft: str | None = "auto",
    temperature: float = 1.0,
    allow_untrained_exits: bool = False,
    draft_gate: str = "measured",
) -> None:
    """Load ``model`` and serve it until SIGTERM / SIGINT (see the module docstring).

    ``strategy`` and its options (``exit_step``, ``threshold``, ``confidence``, ``deep_kv``,
    ``draft_tokens``) are what requests get for the fields they leave out
    (``protocol.Defaults``); ``strategy`` None is ``full``, or the strategy the exit options
    given belong to (``protocol.infer_strategy``). ``draft``: the draft to attach (``earlyexit.load``; ``auto``: the one shipped
    for a named model) for ``speculative`` requests. ``temperature``: the default for
    requests without one. ``exit_vocab``: token ids the exits' head covers (a pruned exit
    head for every request that exits; ``LLMEngine``). ``draft_gate``: whether adaptive
    speculative rounds draft (``measured``, ``always``, ``never``; ``build_app``)."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise EarlyExitError(
            "the server needs FastAPI and uvicorn: pip install 'earlyexit[serve]'"
        ) from None
    import earlyexit
    from earlyexit.serve.app import build_app

    defaults = served_defaults(
        strategy, exit_step, threshold, confidence, deep_kv, draft_tokens, temperature,
        shutdown_timeout, request_timeout, limit_concurrency,
    )  # fmt: skip
    print(f"earlyexit serve: loading {model} ...", file=sys.stderr, flush=True)
    lm = earlyexit.load(model, device=device, dtype=dtype, draft=draft)
    name = name or model_name(model)
    app = build_app(
        lm,
        name,
        policy,
        max_batch,
        max_len,
        max_queue,
        api_key,
        defaults,
        exit_vocab=exit_vocab,
        allow_untrained_exits=allow_untrained_exits,
        draft_gate=draft_gate,
    )
    server = make_server(
        app,
        host,
        port,
        shutdown_timeout=shutdown_timeout,
        limit_concurrency=limit_concurrency,
        request_timeout=request_timeout,
        banner=f"model {name}, policy {policy}, max batch {max_batch}, strategy {defaults.strategy}",
    )
    # uvicorn handles SIGTERM gracefully, then raises it again once it has restored the
    # previous handler: this no-op one makes that a normal return (exit status 0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
