"""The server under load and abuse, on loopback (BENCHMARKS.md, "reliability"):

    pip install -e '.[serve]'   # and httpx (in '.[dev]')
    python scripts/bench_reliability.py [--prompts 1000] [--clients 64]

A test suite of the server more than a benchmark, so it lives outside the package; the
figures it prints are ``docs/reliability.md``'s, and its rows go to
``results/reliability.json``.

A tiny random-weight model (byte-level tokenizer, exits, so early-exit requests are
exercised too) is served in-process by the real FastAPI + uvicorn stack with an API key.
While ``n_requests`` valid completions arrive from ``clients`` concurrent connections,
the harness also, at the same time:

- holds ``idle`` raw TCP connections open that send half a request and then nothing;
- sends malformed requests: invalid JSON, invalid UTF-8, wrong types, unknown models,
  huge ``max_tokens``, empty / over-long / oversized (> body limit) prompts, unusual Unicode,
  a missing or wrong API key;
- starts streaming requests and disconnects after the first chunks.

Checked, and counted in the returned figures: every valid request is answered exactly once
(no lost, no duplicated response ids), with the same text a solo request gets (every
answer is compared with the same prompt decoded alone: no responses crossed between
clients); every malformed one gets its 4xx JSON error and nothing else; after the
disconnects the engine's occupancy returns to zero; the half-sent connections were closed
by the server; the server still answers ``/health`` at the end.

Then, one at a time, on the quiet server:

- **big prompts**: a stream runs while clients send prompts of almost 1 MiB (refused with
  400 before tokenizing); the stream's longest gap between two events, against the same
  stream alone (bar: under 0.5 s);
- **memory**: ``memory_requests`` more requests; the engine's tables must be empty after
  and the process's resident memory flat;
- **engine fault**: every step raises; requests get 500, ``/health`` turns 503; the fault
  is lifted, a request succeeds and ``/health`` is 200 again;
- **non-streaming disconnects**: clients that send a long non-streaming request and close
  the connection once it generates; their requests must be aborted (far fewer tokens
  generated than asked).

The test suite runs a smaller instance (``tests/test_reliability.py``);
``docs/reliability.md`` records the full run's figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

KEY = "reliability-key"

ABUSE = [
    # (label, body bytes, headers, expected status)
    ("invalid JSON", b"{not json", None, 400),
    ("invalid UTF-8", b"\xff\xfe\xfd", None, 400),
    ("JSON array", b"[1, 2, 3]", None, 400),
    ("wrong type", json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), None, 400),
    ("negative temperature", json.dumps({"prompt": "x", "temperature": -1}).encode(), None, 400),
    ("huge max_tokens", json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), None, 400),
    ("empty prompt", json.dumps({"prompt": ""}).encode(), None, 400),
    ("over-long prompt", json.dumps({"prompt": "y" * 5000}).encode(), None, 400),
    ("oversized body", json.dumps({"prompt": "z" * (2 << 20)}).encode(), None, 413),
    ("unknown model", json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), None, 404),
    (
        "bad threshold",
        json.dumps({"prompt": "x", "strategy": "free", "threshold": 7}).encode(),
        None,
        400,
    ),
    ("no API key", json.dumps({"prompt": "x"}).encode(), {"authorization": ""}, 401),
    ("wrong API key", json.dumps({"prompt": "x"}).encode(), {"authorization": "Bearer nope"}, 401),
]

UNICODE_PROMPTS = [
    "emoji 🤖🚀",
    "RTL שלום עולם",
    "combining e\u0301\u0302",
    "NUL \u0000 inside",
    "CJK 日本語の文",
]


def _server(max_batch: int, max_len: int, request_timeout: float):
    import torch

    import earlyexit
    from earlyexit.config import ModelConfig
    from earlyexit.models.decoder import Decoder
    from earlyexit.serve.app import build_app
    from earlyexit.serve.server import bound_port, make_server
    from earlyexit.tokenizer import EOT, byte_level_tokenizer

    tok = byte_level_tokenizer()
    cfg = ModelConfig.from_name(
        "tiny",
        vocab_size=tok.vocab_size,
        max_context=max_len,
        eos_token_ids=[tok.token_to_id(EOT)],
        exits={"steps": [2], "trained": True},
    )
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.init_weights()
    model.eval()
    lm = earlyexit.LM(model, tok)
    app = build_app(lm, "tiny", max_batch=max_batch, max_len=max_len, api_key=KEY)
    # the configuration of `earlyexit serve`, with a short request timeout to watch it work
    server = make_server(app, "127.0.0.1", 0, request_timeout=request_timeout, log_level="critical")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if not server.ready.wait(120):
        raise RuntimeError("the server did not start")
    port = bound_port(server)
    return lm, app, server, thread, f"http://127.0.0.1:{port}", port


def _rss_mb() -> float:
    """Resident memory of this process (Linux), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _wait(cond, timeout: float = 60.0) -> bool:
    """Poll a condition of the server's making; False after ``timeout`` (a backstop)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def run(
    n_requests: int = 1000,
    clients: int = 32,
    max_tokens: int = 4,
    disconnects: int = 20,
    idle: int = 16,
    max_batch: int = 16,
    out: str | None = "results/reliability.json",
    memory_requests: int = 5000,
    big_prompts: int = 4,
    nonstream_disconnects: int = 8,
    request_timeout: float = 2.0,
    gap_tokens: int = 300,
    gap_bar: float = 0.5,
) -> dict:
    """Run the load-and-abuse scenario; returns the figures (see the module docstring).
    ``gap_bar``: the longest gap a stream may show beside the big prompts (seconds)."""
    import httpx

    from earlyexit.bench.common import environment, write_rows
    from earlyexit.decoding.sampling import SamplingParams
    from earlyexit.engine import LLMEngine

    lm, app, server, thread, url, port = _server(max_batch, 2048, request_timeout)
    worker = app.state.worker
    engine = worker.engine
    auth = {"authorization": f"Bearer {KEY}"}
    fails: list[str] = []
    try:
        http = httpx.Client(
            base_url=url,
            headers=auth,
            timeout=120,
            limits=httpx.Limits(max_connections=clients + 8),
        )

        def complete(prompt: str) -> httpx.Response:
            return http.post(
                "/v1/completions",
                json={
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )

        # references: every prompt decoded alone (one request at a time, batch 1)
        alone = LLMEngine(lm.model, lm.tokenizer, "depthwise", max_batch=1, max_len=256)
        greedy = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
        prompts = [f"request {i}" for i in range(n_requests)]
        solo = {p: r.text for p, r in zip(prompts, alone.generate(prompts, greedy))}

        # idle connections: half a request line, then silence, held for the whole run
        idlers = []
        for _ in range(idle):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            idlers.append(s)

        def valid(i: int):
            t = time.perf_counter()
            try:
                r = complete(f"request {i}")
            except httpx.HTTPError as e:
                return i, None, None, time.perf_counter() - t, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t
            if r.status_code != 200:
                return i, None, None, dt, f"HTTP {r.status_code}: {r.text[:200]}"
            body = r.json()
            return i, body["id"], body, dt, None

        bare = httpx.Client(base_url=url, timeout=120)  # no default API key header

        def abuse(item):
            label, body, headers, want = item
            h = {"content-type": "application/json", **auth, **(headers or {})}
            if h.get("authorization") == "":
                del h["authorization"]
            r = bare.post("/v1/completions", content=body, headers=h)
            ok = r.status_code == want and "error" in r.json()
            return label, r.status_code, ok

        def unicode(p: str):
            r = complete(p)
            return p, r.status_code

        def disconnect(i: int) -> bool:
            with http.stream(
                "POST",
                "/v1/completions",
                json={
                    "prompt": f"stream {i}",
                    "max_tokens": 200,
                    "stream": True,
                    "ignore_eos": True,
                },
            ) as r:
                lines = r.iter_lines()
                for _ in range(2):
                    next(lines)
            return True

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            fut_valid = [ex.submit(valid, i) for i in range(n_requests)]
            fut_abuse = [ex.submit(abuse, a) for a in ABUSE * 2]
            fut_uni = [ex.submit(unicode, p) for p in UNICODE_PROMPTS]
            fut_disc = [ex.submit(disconnect, i) for i in range(disconnects)]
            results = [f.result() for f in fut_valid]
            abuse_res = [f.result() for f in fut_abuse]
            uni_res = [f.result() for f in fut_uni]
            disc_ok = sum(bool(f.result()) for f in fut_disc)
        wall = time.perf_counter() - t0

        answered = [r for r in results if r[1] is not None]
        ids = [r[1] for r in answered]
        fails += [f"request {i}: {err}" for i, _, _, _, err in results if err]
        if len(set(ids)) != len(ids):
            fails.append(f"duplicated response ids: {len(ids) - len(set(ids))}")
        short = [i for i, _, b, _, _ in answered if b["usage"]["completion_tokens"] != max_tokens]
        if short:
            fails.append(f"{len(short)} responses with the wrong number of tokens")
        crossed = [
            i
            for i, _, b, _, _ in answered
            if f"request {i}" in solo and b["choices"][0]["text"] != solo[f"request {i}"]
        ]
        if crossed:
            fails.append(f"responses differ from solo runs (crossed?): {crossed[:5]}")
        fails += [f"abuse '{label}': got HTTP {code}" for label, code, ok in abuse_res if not ok]
        fails += [f"unicode prompt {p!r}: HTTP {code}" for p, code in uni_res if code != 200]
        drained = False
        for _ in range(400):
            occ = engine.occupancy()
            if occ["running"] == 0 and occ["waiting"] == 0:
                drained = True
                break
            time.sleep(0.025)
        if not drained:
            fails.append(f"engine still busy after the run: {engine.occupancy()}")
        # the half-sent connections: closed by the server after its request timeout
        idle_closed = 0
        for s in idlers:
            s.settimeout(request_timeout + 60)
            try:
                while s.recv(4096):
                    pass
                idle_closed += 1
            except ConnectionResetError:
                idle_closed += 1
            except OSError:
                pass
            s.close()
        if idle_closed != idle:
            fails.append(f"only {idle_closed} of {idle} half-sent connections were closed")
        healthy = http.get("/health").status_code == 200
        if not healthy:
            fails.append("/health failed after the run")
        lat = sorted(r[3] for r in answered)

        # --- big prompts against a concurrent stream
        def stream_gaps(n_tokens: int = gap_tokens) -> tuple[float, int]:
            times = []
            body = {"prompt": "gap", "max_tokens": n_tokens, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        times.append(time.perf_counter())
            gaps = [b - a for a, b in zip(times, times[1:])]
            return max(gaps, default=0.0), len(times)

        gap_alone, _ = stream_gaps()
        big = json.dumps({"prompt": "z" * ((1 << 20) - 64), "max_tokens": 4}).encode()
        big_codes: list[int] = []

        def send_big(_):
            r = bare.post("/v1/completions", content=big, headers={**auth})
            big_codes.append(r.status_code)

        with ThreadPoolExecutor(big_prompts + 1) as ex:
            fut = ex.submit(stream_gaps)
            for f in [ex.submit(send_big, i) for i in range(big_prompts)]:
                f.result()
            gap_big, _ = fut.result()
        if set(big_codes) != {400}:
            fails.append(f"big prompts answered {sorted(set(big_codes))}, not 400")
        if gap_big >= gap_bar:
            fails.append(f"a stream waited {gap_big:.2f} s between two events beside big prompts")

        # --- memory over many requests
        for i in range(min(200, memory_requests // 5)):  # warm-up: allocator, code paths
            complete(f"warm {i}")
        # resident memory after each half: the first may still grow the allocator's arenas
        # (the clients run in this process too); the second must not grow
        rss = [_rss_mb()]
        codes = []
        for half in range(2):
            with ThreadPoolExecutor(clients) as ex:
                codes += ex.map(
                    lambda i: complete(f"mem {i}").status_code,
                    range(half * memory_requests // 2, (half + 1) * memory_requests // 2),
                )
            rss.append(_rss_mb())
        tables = {
            "requests": len(engine.requests),
            "trackers": len(engine._trackers),
            "streams": len(worker.streams),
        }
        if any(tables.values()) or set(codes) != {200}:
            fails.append(f"after {memory_requests} requests: tables {tables}, codes {set(codes)}")
        if rss[2] - rss[1] > max(5.0, 0.05 * rss[1]):
            fails.append(f"resident memory grew {rss[2] - rss[1]:.1f} MB over the second half")

        # --- an engine fault: health 503, then recovery
        runner = engine.runner
        real_prefill = runner.prefill

        def broken(*a, **k):
            raise RuntimeError("injected fault")

        runner.prefill = broken
        try:
            fault_codes = [complete(f"fault {i}").status_code for i in range(3)]
            health_fault = http.get("/health").status_code
        finally:
            runner.prefill = real_prefill
        recovered = complete("request 0")
        health_after = http.get("/health").status_code
        fault_ok = (
            fault_codes == [500] * 3
            and health_fault == 503
            and recovered.status_code == 200
            and recovered.json()["choices"][0]["text"] == solo["request 0"]
            and health_after == 200
        )
        if not fault_ok:
            fails.append(
                f"engine fault: codes {fault_codes}, health {health_fault}, then "
                f"{recovered.status_code} and health {health_after}"
            )

        # --- non-streaming clients that leave
        asked = 1500
        aborted_early = 0
        for i in range(nonstream_disconnects):
            before = engine.stats["tokens"]
            body = json.dumps({"prompt": f"leave {i}", "max_tokens": asked, "ignore_eos": True})
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(
                f"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode()
            )
            _wait(lambda b=before: engine.stats["tokens"] - b >= 5)
            s.close()
            _wait(lambda: engine.occupancy()["running"] == 0)
            if engine.stats["tokens"] - before < asked // 2:
                aborted_early += 1
        if aborted_early != nonstream_disconnects:
            fails.append(
                f"{nonstream_disconnects - aborted_early} non-streaming requests ran on "
                f"after their client left"
            )
        figures = {
            "bench": "reliability",
            "requests": n_requests,
            "clients": clients,
            "answered": len(answered),
            "failures": len(fails),
            "failure_details": fails[:20],
            "duplicates": len(ids) - len(set(ids)),
            "abusive_requests": len(abuse_res),
            "abusive_refused_correctly": sum(ok for _, _, ok in abuse_res),
            "unicode_prompts_served": sum(code == 200 for _, code in uni_res),
            "disconnects": disc_ok,
            "idle_connections": idle,
            "idle_closed_by_server": idle_closed,
            "request_timeout_s": request_timeout,
            "slots_freed": drained,
            "healthy_after": healthy,
            "stream_max_gap_alone_s": gap_alone,
            "stream_max_gap_beside_big_prompts_s": gap_big,
            "big_prompts_refused": big_codes.count(400),
            "memory_requests": memory_requests,
            "rss_mb_before_half_after": rss,
            "engine_tables_after": tables,
            "fault_codes": fault_codes,
            "health_during_fault": health_fault,
            "health_after_recovery": health_after,
            "fault_recovered": fault_ok,
            "nonstream_disconnects": nonstream_disconnects,
            "nonstream_aborted_early": aborted_early,
            "latency_p50_s": statistics.median(lat) if lat else None,
            "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "requests_per_s": len(answered) / wall,
            "wall_s": wall,
            "env": environment(0),
        }
        http.close()
        bare.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    write_rows([figures], out)
    return figures


def main(argv: list[str] | None = None) -> int:
    """The full-size run; exit status 1 when any check failed."""
    ap = argparse.ArgumentParser(
        description="The server under load and abuse, on loopback (docs/reliability.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--prompts", type=int, default=1000, help="valid completion requests")
    ap.add_argument("--clients", type=int, default=64, help="concurrent clients")
    ap.add_argument("--out", default="results/reliability.json", help="the figures' JSON row")
    a = ap.parse_args(argv)
    fig = run(n_requests=a.prompts, clients=a.clients, out=a.out)
    print(json.dumps({k: v for k, v in fig.items() if k != "env"}, indent=1))
    return 0 if fig["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
