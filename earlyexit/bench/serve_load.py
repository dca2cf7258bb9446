"""Benchmark ``serve``: does the HTTP server keep the engine's throughput under concurrent clients?

    earlyexit bench serve --model runs/stdlib-small-rec-exit/final [--clients 64] [--prompts 256]

The same seeded request stream as ``depthwise`` is served twice: by the engine offline (all
requests added at once), and through the OpenAI-compatible server on loopback by ``clients``
concurrent streaming clients (threads with httpx in a separate process, as real clients
are; each sends its share of the requests one after another). Reports throughput of both and their ratio,
failed requests, and per-request latency (p50 / p99) and time to first token.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from earlyexit.bench.common import environment, load_model, set_threads, write_rows
from earlyexit.bench.depthwise import request_stream
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.engine import ExitMode, LLMEngine


def _server_stack() -> dict:
    """Which optional fast paths the server ran with (they change the figure)."""
    import importlib.util

    return {m: importlib.util.find_spec(m) is not None for m in ("orjson", "uvloop", "httptools")}


def _client(url: str, share: list, out: dict, lock: threading.Lock) -> None:
    """One streaming client: its share of the requests, one after another."""
    import httpx

    with httpx.Client(timeout=600) as c:
        for prompt, g in share:
            t0 = time.perf_counter()
            first = None
            n = 0
            try:
                body = {
                    "prompt": prompt,
                    "max_tokens": g,
                    "temperature": 0,
                    "stream": True,
                    "ignore_eos": True,
                }
                with c.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}")
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        first = first or time.perf_counter()
                        n += len(json.loads(line[6:]).get("depths", []))
                if n != g:
                    raise RuntimeError(f"got {n} of {g} tokens")
                with lock:
                    out["latencies"].append(time.perf_counter() - t0)
                    out["ttfts"].append(first - t0)
                    out["got"] += n
            except Exception as e:
                with lock:
                    out["failures"].append(repr(e))


def _drive_clients(url: str, shares: list) -> tuple:
    """All clients, one thread each (in the client process); returns the figures."""
    out = {"latencies": [], "ttfts": [], "failures": [], "got": 0}
    lock = threading.Lock()
    t = time.perf_counter()
    with ThreadPoolExecutor(len(shares)) as ex:
        list(ex.map(lambda sh: _client(url, sh, out, lock), shares))
    return out["latencies"], out["ttfts"], out["failures"], out["got"], time.perf_counter() - t


def run(
    model: str,
    data: str = "data/stdlib",
    clients: int = 64,
    n_requests: int = 256,
    policy: str = "depthwise",
    threshold: float | None = 0.3,
    max_batch: int = 32,
    threads: int | None = None,
    out: str | None = "results/serve.json",
    mean_len: float = 128.0,
) -> list[dict]:
    from earlyexit.serve.app import build_app
    from earlyexit.serve.server import bound_port, make_server

    threads = set_threads(threads)
    env = environment(threads)
    lm = load_model(model)
    stream = request_stream(data, n_requests, mean_len)
    exit = (
        ExitMode(lm.config.exits.steps[0], threshold)
        if threshold is not None and lm.config.exits.steps
        else None
    )
    max_len = 64 + 256 + 1

    def offline() -> tuple[float, int]:
        """The engine alone on the same stream: (seconds, tokens)."""
        engine = LLMEngine(
            lm.model,
            policy=policy,
            max_batch=max_batch,
            max_len=max_len,
            allow_untrained_exits=True,  # a load test: quality is not what it measures
        )
        params = [SamplingParams(max_new_tokens=g, ignore_eos=True) for _, g in stream]
        t = time.perf_counter()
        reqs = [
            engine.requests[engine.add_request(p, sp, exit)] for (p, _), sp in zip(stream, params)
        ]
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t, sum(len(r.output_ids) for r in reqs)

    offline_s, tokens = offline()  # the reference: the engine in the main thread
    # The server's engine runs on a thread of its own; torch's thread pool has been seen to
    # behave very differently there (a loaded 2-core VM: 6x faster than the main thread).
    # The same offline run on a thread tells the HTTP layer's cost apart from that.
    on_thread: list = []
    th = threading.Thread(target=lambda: on_thread.append(offline()))
    th.start()
    th.join()
    offline_thread_s = on_thread[0][0]
    # the server on loopback
    from earlyexit.serve.protocol import Defaults

    defaults = Defaults() if exit is None else Defaults("free", exit.step, exit.threshold)
    app = build_app(
        lm,
        "bench",
        policy,
        max_batch,
        max_len,
        max_queue=4 * n_requests,
        defaults=defaults,
        allow_untrained_exits=True,
    )
    server = make_server(app, "127.0.0.1", 0, log_level="error")  # as `earlyexit serve`
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    if not server.ready.wait(120):
        raise RuntimeError("the server did not start")
    url = f"http://127.0.0.1:{bound_port(server)}/v1/completions"
    shares = [stream[i::clients] for i in range(clients)]
    # The clients run in their own process, as real clients do: 64 client threads inside the
    # server's process would take the GIL from the engine thread and measure that instead.
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        latencies, ttfts, failures, got, served_s = pool.apply(_drive_clients, (url, shares))
    server.should_exit = True
    th.join(timeout=10)
    row = {
        "bench": "serve",
        "model": model,
        "policy": policy,
        "exit": None if exit is None else {"step": exit.step, "threshold": exit.threshold},
        "clients": clients,
        "requests": n_requests,
        "tokens": tokens,
        "offline_seconds": offline_s,
        "offline_tokens_per_s": tokens / offline_s,
        "offline_on_a_thread_tokens_per_s": tokens / offline_thread_s,
        "served_seconds": served_s,
        "served_tokens_per_s": got / served_s,
        "ratio": (got / served_s) / (tokens / offline_s),
        "ratio_to_offline_on_a_thread": (got / served_s) / (tokens / offline_thread_s),
        "clients_in": "a separate process",
        "server": _server_stack(),
        "failed": len(failures),
        "failures": failures[:5],
        "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
        "ttft_p50_s": float(np.percentile(ttfts, 50)) if ttfts else None,
        "ttft_p99_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "env": env,
    }
    print(
        f"  offline {row['offline_tokens_per_s']:.0f} tok/s (on a thread "
        f"{row['offline_on_a_thread_tokens_per_s']:.0f}), served {row['served_tokens_per_s']:.0f} "
        f"tok/s ({row['ratio']:.2f}x; {row['ratio_to_offline_on_a_thread']:.2f}x of the thread run), "
        f"failed {row['failed']}, p50 {row['latency_p50_s']:.2f}s p99 {row['latency_p99_s']:.2f}s",
        flush=True,
    )
    write_rows([row], out)
    return [row]
