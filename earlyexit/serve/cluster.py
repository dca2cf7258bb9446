"""Replicas of the engine on Ray Serve: ``earlyexit serve --replicas N`` (the ``cluster`` extra).

One process in front, N engine replicas behind it, each a Ray Serve replica (its own
process, its own ``--threads``) running the very application of :func:`build_app` (routes,
validation, errors, API key: one code path for the API).

- **The front** (:class:`Front`) is the HTTP server: the same uvicorn set-up as ``earlyexit
  serve`` (:func:`~earlyexit.serve.server.make_server`: loopback by default, bounded
  connections, a deadline for each request to arrive, a shutdown deadline). It is a byte
  pipe: it reads the request (bounded like the app's ``max_body_bytes``), hands the ASGI
  scope and body to a replica through a Ray Serve ``DeploymentHandle`` and streams the
  replica's ASGI messages back. It answers two things itself: a replica that died (or
  could not be reached) under a request (503 with ``Retry-After``, OpenAI-shaped; a stream
  already under way ends with an SSE ``error`` event with code 503), and ``/health``, which
  adds the cluster's state (``replicas``: running and target) to a replica's own answer.
- **The replicas** (:class:`EngineReplica`) run the app on ASGI messages in process. A
  replica reports its load to Ray Serve as the layer steps its engine still owes
  (``LLMEngine.queued_layer_steps``), and fails Ray's health check once its engine thread
  has stopped, so Ray replaces it. Ray also restarts a replica whose process dies.
- **Routing**: ``router="work"`` (Ray Serve's request router API,
  :mod:`earlyexit.serve.cluster_router`) sends each request to the replica that owes the
  fewest layer steps; ``router="ray"``, the default, keeps Ray Serve's own (power of two
  choices over requests in flight), which measured no slower on 2 cores (BENCHMARKS.md).

Ray is imported only when a cluster starts; without it :func:`require_ray` raises an
error that names the extra to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from earlyexit.errors import EarlyExitError, InputError
from earlyexit.serve.protocol import dumps

APP = "earlyexit"  # the Ray Serve application
DEPLOYMENT = "engine"  # its one deployment: the engine replicas
ROUTERS = ("work", "ray")
MAX_BODY_BYTES = 1 << 20  # build_app's default; the front reads no more than this
# scope keys a replica needs to run the app (the rest of uvicorn's scope stays in front)
_SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "root_path",
    "query_string",
    "headers",
    "client",
    "server",
)


def require_ray():
    """``(ray, ray.serve)``; an :class:`EarlyExitError` naming the extra when Ray Serve is
    not installed."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise EarlyExitError(
            "--replicas runs the engine replicas on Ray Serve, which is not installed: "
            "pip install 'earlyexit[cluster]'"
        ) from None
    return ray, serve


@dataclass
class ReplicaSpec:
    """What each replica loads and serves (picklable: Ray sends it to every replica).

    ``app_kw``: keyword arguments of :func:`build_app` (policy, max batch, defaults, ...);
    ``load_kw``: of :func:`earlyexit.load` (device, dtype, draft)."""

    model: str
    name: str
    threads: int = 1
    app_kw: dict = field(default_factory=dict)
    load_kw: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- replicas
class EngineReplica:
    """One engine replica: the app of :func:`build_app` over its own engine, called with
    ASGI messages (``__call__``). Ray Serve makes it a deployment (:func:`deployment`)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import torch

        import earlyexit
        from earlyexit.serve.app import build_app

        torch.set_num_threads(spec.threads)
        lm = earlyexit.load(spec.model, **spec.load_kw)
        self.app = build_app(lm, spec.name, **spec.app_kw)
        self.worker = self.app.state.worker
        self.pid = str(os.getpid()).encode()
        self.reports = 0

    async def __call__(self, scope: dict, body: bytes, cost: int = 0):
        """Run one HTTP request through the app; yields lists of ASGI messages (all that
        the app sent since the last yield). ``cost``: the front's estimate of the request's
        work, read by the router only. Closing the generator (the client left, the front
        shut down) cancels the app's handler, which aborts the request in the engine."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":  # which replica answered
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-earlyexit-replica", self.pid)],
                }
            messages.put_nowait(message)

        task = asyncio.ensure_future(self.app({**scope, "state": {}}, receive, send))
        try:
            while True:
                get = asyncio.ensure_future(messages.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                batch = [get.result()] if get.done() and not get.cancelled() else []
                while not messages.empty():
                    batch.append(messages.get_nowait())
                if batch:
                    yield batch
                if task.done() or _ends(batch):
                    break
            await task
        finally:
            gone.set()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def record_routing_stats(self) -> dict:
        """What this replica tells the request router: the layer steps its engine owes."""
        self.reports += 1
        engine = self.worker.engine
        return {
            "queued_layer_steps": engine.queued_layer_steps(),
            "n_steps": engine.L,
            "report": self.reports,
        }

    def check_health(self) -> None:
        """Ray's health check: a replica whose engine thread stopped is replaced."""
        if self.worker.error is not None or not self.worker.thread.is_alive():
            raise RuntimeError(self.worker.problem() or "the engine thread stopped")

    def __del__(self) -> None:
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close()


def _ends(batch: list[dict]) -> bool:
    return any(m["type"] == "http.response.body" and not m.get("more_body") for m in batch)


def deployment(
    spec: ReplicaSpec,
    replicas: int,
    router: str = "ray",
    shutdown_timeout: float = 30.0,
    max_ongoing_requests: int | None = None,
    stats_period_s: float = 0.2,
):
    """The Ray Serve application of ``replicas`` engine replicas (``serve.run`` it).

    ``router``: ``ray`` (Ray Serve's default) or ``work`` (least layer steps owed,
    :mod:`earlyexit.serve.cluster_router`). ``max_ongoing_requests`` per replica defaults
    to its max batch plus max queue, so a full engine answers with its own 503 (queue full) as the
    single-process server does. ``shutdown_timeout``: seconds a replica being stopped gives
    its requests in flight."""
    _, serve = require_ray()
    if router not in ROUTERS:
        raise InputError(f"--router must be one of {', '.join(ROUTERS)}, got {router!r}")
    kw = spec.app_kw
    if max_ongoing_requests is None:
        max_ongoing_requests = kw.get("max_batch", 32) + kw.get("max_queue", 1024)
    options = dict(
        name=DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": spec.threads},
        max_ongoing_requests=max_ongoing_requests,
        graceful_shutdown_timeout_s=shutdown_timeout,
        health_check_period_s=1.0,
    )
    if router == "work":
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="earlyexit.serve.cluster_router:WorkAwareRouter",
            request_routing_stats_period_s=stats_period_s,
            request_routing_stats_timeout_s=max(stats_period_s * 10, 5.0),
        )
    return serve.deployment(EngineReplica, **options).bind(spec)


def start(spec: ReplicaSpec, replicas: int, **kw):
    """Deploy the replicas on the connected Ray cluster and wait until all run; returns the
    ``DeploymentHandle`` the front calls. Keyword arguments: :func:`deployment`'s."""
    _, serve = require_ray()
    serve.start(proxy_location="Disabled")  # the front is the HTTP server
    return serve.run(deployment(spec, replicas, **kw), name=APP, route_prefix=None)


def replica_counts() -> tuple[int, int]:
    """(running, target) replicas of the engine deployment, as Ray Serve's controller
    sees them."""
    _, serve = require_ray()
    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0, 0
    d = app.deployments[DEPLOYMENT]
    running = sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
    target = getattr(d, "target_num_replicas", None)
    return running, target if target is not None else _target.get(APP, running)


_target: dict[str, int] = {}


# --------------------------------------------------------------------------- the front
def _error_body(status: int, message: str) -> bytes:
    return dumps(
        {"error": {"message": message, "type": "server_error", "param": None, "code": status}}
    )


def _cost(method: str, body: bytes) -> int:
    """The request's tokens at most (``max_tokens``): the router's estimate of its work
    before its replica has reported it; 0 when the body does not say."""
    if method != "POST" or not body:
        return 0
    try:
        d = json.loads(body)
        n = d.get("max_tokens", d.get("max_completion_tokens", 16))
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0
    except (ValueError, RecursionError, AttributeError):
        return 0


class Front:
    """The HTTP side of the cluster (an ASGI app): forwards each request to a replica.

    ``handle``: the engine deployment's ``DeploymentHandle``; ``replicas``: the target
    count; ``counts``: returns (running, target) replicas (default :func:`replica_counts`).
    Has ``state.worker.abort_all`` as :func:`make_server` expects: at the shutdown deadline
    it ends every request still in flight."""

    def __init__(self, handle, replicas: int, counts=None, max_body_bytes: int = MAX_BODY_BYTES):
        self.handle = handle.options(stream=True)
        self.replicas = replicas
        self.counts = counts or replica_counts
        self.max_body_bytes = max_body_bytes
        self.inflight: set[asyncio.Task] = set()
        self.state = SimpleNamespace(worker=self)
        _target[APP] = replicas

    # make_server's shutdown deadline
    def abort_all(self) -> None:
        for task in list(self.inflight):
            task.cancel()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif m["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await self._body(scope, receive)
        if body is None:
            return  # the client left while sending
        if scope["method"] == "GET" and scope["path"] == "/health":
            await self._health(scope, body, send)
            return
        task = asyncio.current_task()
        self.inflight.add(task)
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await self._forward(scope, body, send, watch)
        finally:
            watch.cancel()
            self.inflight.discard(task)

    async def _body(self, scope, receive) -> bytes | None:
        """The request body; no more than the limit plus one byte (the app then answers
        413, as it does in one process). A declared length over the limit is not read at
        all: the app answers from the header."""
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return b""
        raw = bytearray()
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                return None
            raw += m.get("body", b"")
            if not m.get("more_body") or len(raw) > self.max_body_bytes:
                return bytes(raw)

    async def _forward(self, scope, body: bytes, send, watch) -> None:
        gen = self.handle.remote(
            {k: scope[k] for k in _SCOPE_KEYS if k in scope},
            body,
            cost=_cost(scope["method"], body),
        )
        start = None  # held until the first body: an error before it can still be a 503
        started = ended = False
        try:
            it = gen.__aiter__()
            while not ended:
                nxt = asyncio.ensure_future(it.__anext__())
                nxt.add_done_callback(_retrieved)
                await asyncio.wait({nxt, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():  # the client left: let the replica abort the request
                    nxt.cancel()
                    gen.cancel()
                    return
                try:
                    batch = nxt.result()
                except StopAsyncIteration:
                    break
                for m in batch:
                    if m["type"] == "http.response.start":
                        start = m
                        continue
                    if start is not None:
                        await send(start)
                        start, started = None, True
                    await send(m)
                    ended = not m.get("more_body")
            if not ended:
                raise RuntimeError("the replica ended the response early")
        except asyncio.CancelledError:
            gen.cancel()
            if started and not ended:  # the shutdown deadline: end the stream readably
                with contextlib.suppress(Exception):
                    await send(_sse_end("the server is shutting down; retry"))
            raise
        except Exception as e:  # the replica died or could not be reached
            message = (
                f"the replica serving this request stopped ({type(e).__name__}); retry the request"
            )
            if not started:
                await _send_json(send, 503, _error_body(503, message), retry=True)
            elif not ended:
                await send(_sse_end(message))

    async def _health(self, scope, body: bytes, send) -> None:
        """A replica's own /health, with the cluster's replica counts added: ``ok`` when all
        run, ``degraded`` (200: it serves) when some do, 503 when none can."""
        loop = asyncio.get_running_loop()
        try:
            running, target = await loop.run_in_executor(None, self.counts)
        except Exception as e:
            running, target = 0, self.replicas
            detail = f"the cluster's state is unknown ({type(e).__name__})"
        else:
            detail = f"no replica is running (0 of {target}); Ray is starting them"
        replicas = {"running": running, "target": target}
        if running == 0:
            payload = {"status": "error", "detail": detail, "replicas": replicas}
            await _send_json(send, 503, dumps(payload), retry=True)
            return
        status, answer = await self._ask_replica(scope, body)
        if status != 200:
            answer["replicas"] = replicas
            await _send_json(send, 503, dumps(answer), retry=True)
            return
        answer["status"] = "ok" if running >= target else "degraded"
        answer["replicas"] = replicas
        await _send_json(send, 200, dumps(answer))

    async def _ask_replica(self, scope, body: bytes) -> tuple[int, dict]:
        status, raw = 503, b""
        try:
            gen = self.handle.remote({k: scope[k] for k in _SCOPE_KEYS if k in scope}, body)
            async for batch in gen:
                for m in batch:
                    if m["type"] == "http.response.start":
                        status = m["status"]
                    else:
                        raw += m.get("body", b"")
            return status, json.loads(raw)
        except Exception as e:
            return 503, {"status": "error", "detail": f"no replica answered ({type(e).__name__})"}


def _retrieved(future: asyncio.Future) -> None:
    """Marks a future's exception as seen (a cancelled request's is expected)."""
    if not future.cancelled():
        future.exception()


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse_end(message: str) -> dict:
    return {
        "type": "http.response.body",
        "body": b"data: " + _error_body(503, message) + b"\n\n",
        "more_body": False,
    }


async def _send_json(send, status: int, body: bytes, retry: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# --------------------------------------------------------------------------- the command
def serve_cluster(
    spec: ReplicaSpec,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    router: str = "ray",
    shutdown_timeout: float = 30.0,
    limit_concurrency: int | None = None,
    request_timeout: float = 30.0,
    banner: str = "",
) -> None:
    """``earlyexit serve --replicas N``: join the Ray cluster ``RAY_ADDRESS`` names (or start
    one on this machine), deploy ``replicas`` engine replicas of ``threads`` CPUs each, and
    serve the front on ``host:port`` until SIGTERM / SIGINT; then the front drains (the
    shutdown deadline of ``earlyexit serve``) and the replicas are stopped."""
    import signal

    ray, serve = require_ray()
    from earlyexit.serve.server import make_server

    if replicas < 1:
        raise InputError(f"--replicas must be >= 1, got {replicas}")
    if spec.threads < 1:
        raise InputError(f"--threads must be >= 1, got {spec.threads}")
    if router not in ROUTERS:
        raise InputError(f"--router must be one of {', '.join(ROUTERS)}, got {router!r}")
    address = os.environ.get("RAY_ADDRESS")
    print(
        f"earlyexit serve: {'joining the Ray cluster at ' + address if address else 'starting Ray'}"
        f" for {replicas} replica(s) of {spec.model} ...",
        file=sys.stderr,
        flush=True,
    )
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines are for Ray users
    ray.init(include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if replicas * spec.threads > cpus:
            raise InputError(
                f"{replicas} replicas x {spec.threads} threads need {replicas * spec.threads} "
                f"CPUs; the Ray cluster has {cpus:g} (fewer --replicas or --threads, or add "
                "nodes with `ray start --address`)"
            )
        from earlyexit.io.registry import resolve_model

        resolve_model(spec.model)  # a named model is converted once here, not per replica
        t = time.monotonic()
        try:
            handle = start(spec, replicas, router=router, shutdown_timeout=shutdown_timeout)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise EarlyExitError(f"the replicas did not start: {first}") from None
        front = Front(handle, replicas)
        if limit_concurrency is None:
            kw = spec.app_kw
            limit_concurrency = replicas * (kw.get("max_batch", 32) + kw.get("max_queue", 1024))
            limit_concurrency += 32
        server = make_server(
            front,
            host,
            port,
            shutdown_timeout=shutdown_timeout,
            limit_concurrency=limit_concurrency,
            request_timeout=request_timeout,
            banner=f"{replicas} replicas ({spec.threads} threads each, up in "
            f"{time.monotonic() - t:.0f} s, router {router}), {banner}",
        )
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
