"""``earlyexit bench reliability``: the server under load and abuse, on loopback.

    earlyexit bench reliability [--prompts 1000] [--clients 32]

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
(no lost, no duplicated response ids), with the same text a solo request gets (no responses
crossed between clients); every malformed one gets its 4xx JSON error and nothing else;
after the disconnects the engine's occupancy returns to zero; the server still answers
``/health`` at the end. The test suite runs a smaller instance (``tests/test_reliability.py``);
``docs/reliability.md`` records the full run's figures.
"""

from __future__ import annotations

import json
import socket
import statistics
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


def _server(max_batch: int, max_len: int):
    import torch
    import uvicorn

    import earlyexit
    from earlyexit.config import ModelConfig
    from earlyexit.models.decoder import Decoder
    from earlyexit.serve.app import build_app
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
    app = build_app(
        earlyexit.LM(model, tok), "tiny", max_batch=max_batch, max_len=max_len, api_key=KEY
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.025)
    return app, server, thread, f"http://127.0.0.1:{port}", port


def run(
    n_requests: int = 1000,
    clients: int = 32,
    max_tokens: int = 4,
    disconnects: int = 20,
    idle: int = 16,
    max_batch: int = 16,
    out: str | None = "results/reliability.json",
) -> dict:
    """Run the load-and-abuse scenario; returns the figures (see the module docstring)."""
    import httpx

    from earlyexit.bench.common import environment, write_rows

    app, server, thread, url, port = _server(max_batch, 256)
    engine = app.state.worker.engine
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

        # references: a few prompts answered alone, before any load
        probe = [f"request {i}" for i in range(0, n_requests, max(1, n_requests // 10))]
        solo = {p: complete(p).json()["choices"][0]["text"] for p in probe}

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
        for s in idlers:
            s.close()
        healthy = http.get("/health").status_code == 200
        if not healthy:
            fails.append("/health failed after the run")
        lat = sorted(r[3] for r in answered)
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
            "slots_freed": drained,
            "healthy_after": healthy,
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
