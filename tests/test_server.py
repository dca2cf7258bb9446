"""The OpenAI-compatible server, driven by the real `openai` client and raw sockets on
loopback. Hardening (issue 16): no stalls, no leaks, honest health, bounded connections."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import earlyexit  # noqa: E402
from earlyexit.decoding.sampling import SamplingParams  # noqa: E402
from earlyexit.serve import protocol  # noqa: E402
from earlyexit.serve.app import build_app  # noqa: E402
from earlyexit.serve.server import make_server, model_name  # noqa: E402
from earlyexit.tokenizer import EOT, byte_level_tokenizer  # noqa: E402
from tests.conftest import make_model  # noqa: E402

# a Llama-2-style template: it refuses a conversation that does not start with the user
TEMPLATE = (
    "{% if messages[0]['role'] != 'user' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
)
WAIT = 60  # seconds: a backstop for waits on events, never a delay


def tiny_lm(max_context=256):
    tok = byte_level_tokenizer()
    model = make_model(
        vocab_size=tok.vocab_size,
        n_layers=4,
        max_context=max_context,
        eos_token_ids=[tok.token_to_id(EOT)],
        exits={"steps": [2], "trained": True},
    )
    return earlyexit.LM(model, tok)


class Server:
    """The app under the same uvicorn configuration as `earlyexit serve`, in a thread."""

    def __init__(self, lm=None, server_kw=None, **kw):
        self.lm = lm or tiny_lm()
        self.app = build_app(self.lm, "tiny", chat_template=TEMPLATE, **kw)
        self.server = make_server(self.app, "127.0.0.1", 0, log_level="error", **(server_kw or {}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert self.server.ready.wait(WAIT)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker = self.app.state.worker
        self.engine = self.worker.engine

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, body, **kw):
        return httpx.post(self.url + "/v1/completions", json=body, timeout=WAIT, **kw)

    def health(self):
        return httpx.get(self.url + "/health", timeout=WAIT)

    def wait_until(self, cond, what="condition"):
        """Wait for a condition of the engine thread's making (backstop: WAIT seconds)."""
        deadline = time.monotonic() + WAIT
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Server(max_batch=4, max_len=200)
    yield s
    s.stop()


def sse_events(r):
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_completion_with_compute_accounting(server):
    r = server.client().completions.create(
        model="tiny", prompt="def main(", max_tokens=8, temperature=0
    )
    assert r.choices[0].finish_reason in ("length", "stop") and isinstance(r.choices[0].text, str)
    u = r.usage.model_dump()
    assert u["prompt_tokens"] == len("def main(") and 1 <= u["completion_tokens"] <= 8
    assert u["steps_run"] == 4 * u["completion_tokens"] and u["full_depth_fraction"] == 1.0


def test_streaming_equals_non_streaming_and_early_exit_reports_depth(server):
    c = server.client()
    full = c.completions.create(
        model="tiny",
        prompt="import os",
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    chunks = list(
        c.completions.create(
            model="tiny",
            prompt="import os",
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"
    ex = c.completions.create(
        model="tiny",
        prompt="import os",
        max_tokens=10,
        temperature=0,
        extra_body={"strategy": "free", "threshold": -1.0},
    )
    assert (
        ex.usage.model_dump()["average_depth"] < 4
    )  # every generated token after the first exits at 2
    for deep_kv in ("propagate", "skip"):  # no catch-up: the same exits, the same depths
        ex2 = c.completions.create(
            model="tiny",
            prompt="import os",
            max_tokens=10,
            temperature=0,
            extra_body={"strategy": "free", "threshold": -1.0, "deep_kv": deep_kv},
        )
        assert ex2.usage.model_dump()["average_depth"] == ex.usage.model_dump()["average_depth"]


def test_chat_and_token_id_prompts(server):
    c = server.client()
    r = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert r.choices[0].message.role == "assistant" and isinstance(
        r.choices[0].message.content, str
    )
    parts = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == (
        r.choices[0].message.content
    )
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens >= 1
    ids = c.completions.create(model="tiny", prompt=[100, 101, 102], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    assert [m.id for m in c.models.list().data] == ["tiny"]


def deep(n):
    return ('{"prompt": ' + "[" * n + "]" * n + "}").encode()


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": ""}).encode(), 400, "empty"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), 400, "n = 1"),
    (json.dumps({"prompt": "x", "max_tokens": 10_000}).encode(), 400, "exceeds the context"),
    (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "x", "logprobs": 5}).encode(), 400, "logprobs"),
    (json.dumps({"prompt": "x", "strategy": "free", "threshold": 3}).encode(), 400, "threshold"),
    (json.dumps({"prompt": "x" * 300}).encode(), 400, "exceeds the context"),
    (b'{"prompt": "\\ud800 lone surrogate"}', None, None),
    (b"\xff\xfe bad utf-8", 400, "not valid JSON"),
    # issue 16 point 5: JSON nested 100k deep was a RecursionError and a 500
    pytest.param(deep(100_000), 400, "", id="nested-100k-deep"),
    # point 9: never ignore a field silently
    (json.dumps({"prompt": "x", "strategy": "full", "threshold": 0.5}).encode(), 400, "threshold"),
    (json.dumps({"prompt": "x", "exit_step": 2, "strategy": "full"}).encode(), 400, "exit_step"),
    (json.dumps({"prompt": "x", "strategy": "free", "deep_kv": "x"}).encode(), 400, "deep_kv"),
    (json.dumps({"prompt": "x", "deep_kv": "skip", "strategy": "full"}).encode(), 400, "deep_kv"),
    (json.dumps({"prompt": "x", "repetition_penalty": 1.2}).encode(), 400, "repetition_penalty"),
    (json.dumps({"prompt": "x", "presence_penalty": 3}).encode(), 400, "presence_penalty"),
    (json.dumps({"prompt": "x", "frequency_penalty": "a"}).encode(), 400, "frequency_penalty"),
]


@pytest.mark.parametrize("fast_json", [True, False], ids=["orjson", "json"])
@pytest.mark.parametrize("body, status, needle", BAD)
def test_bad_requests_get_openai_errors(server, monkeypatch, fast_json, body, status, needle):
    if not fast_json:
        monkeypatch.setattr(protocol, "_orjson", None)
    elif protocol._orjson is None:
        pytest.skip("orjson is not installed")
    r = httpx.post(
        server.url + "/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=WAIT,
    )
    if status is None:  # unusual but valid JSON: served or refused cleanly, never a 500
        assert r.status_code in (200, 400)
        return
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status
    # the server keeps serving
    assert server.health().json() == {"status": "ok"}


def test_chat_template_raise_exception_is_a_400(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "assistant", "content": "hi"}]},
        timeout=WAIT,
    )
    assert r.status_code == 400, r.text
    assert "Conversation roles must alternate" in r.json()["error"]["message"]


def test_concurrent_clients_all_get_their_own_answers(server):
    c = server.client()

    def one(i):
        r = c.completions.create(
            model="tiny",
            prompt=f"x = {i}",
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return i, r.id, r.choices[0].text

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(48)))
    assert len({rid for _, rid, _ in results}) == 48
    solo = {
        i: c.completions.create(
            model="tiny",
            prompt=f"x = {i}",
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
        for i in (0, 7, 47)
    }
    for i, _, text in results:
        if i in solo:
            assert text == solo[i]
    assert server.engine.occupancy()["running"] == 0


def test_streaming_client_disconnect_frees_the_slot(server, monkeypatch):
    runner = server.engine.runner
    real_run, left = runner.run, threading.Event()

    def run(*a, **k):  # the engine waits until the client has gone, then goes on
        assert left.wait(WAIT)
        return real_run(*a, **k)

    monkeypatch.setattr(runner, "run", run)
    before = server.engine.stats["tokens"]
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "a", "max_tokens": 150, "stream": True, "ignore_eos": True},
        timeout=WAIT,
    ) as r:
        next(ln for ln in r.iter_lines() if ln.startswith("data: {"))
    left.set()
    server.wait_until(lambda: server.engine.occupancy()["running"] == 0, "the abort")
    assert server.engine.stats["tokens"] - before < 150


# ---------------------------------------------------------------- issue 16, point 1
def test_tokenizing_blocks_neither_the_event_loop_nor_the_engine(server, monkeypatch):
    """A prompt being tokenized (here: held inside the tokenizer until released) must not
    stop /health or a concurrent stream: tokenizing runs on a worker thread, without the
    engine lock. Before: on the event loop, under the lock (a 1 MiB prompt stalled all)."""
    tok = server.engine.tokenizer
    real = tok.encode
    entered, release = threading.Event(), threading.Event()

    def slow_encode(text, *a, **k):
        if text.startswith("SLOW"):
            entered.set()
            assert release.wait(WAIT)
        return real(text, *a, **k)

    monkeypatch.setattr(tok, "encode", slow_encode)
    with ThreadPoolExecutor(1) as ex:
        slow = ex.submit(server.post, {"prompt": "SLOW prompt", "max_tokens": 2})
        assert entered.wait(WAIT)
        try:
            assert server.health().status_code == 200
            with httpx.stream(
                "POST",
                server.url + "/v1/completions",
                json={"prompt": "go", "max_tokens": 5, "stream": True, "ignore_eos": True},
                timeout=WAIT,
            ) as r:
                events = sse_events(r)
            assert sum(len(e["depths"]) for e in events) == 5
        finally:
            release.set()
        assert slow.result().status_code == 200


def test_an_over_long_prompt_is_refused_before_it_is_tokenized(server, monkeypatch):
    calls = []
    tok = server.engine.tokenizer
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **k: calls.append(1) or real(text))
    t = time.monotonic()
    r = server.post({"prompt": "y" * 1_000_000})
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    assert calls == []
    assert time.monotonic() - t < WAIT
    ids = server.post({"prompt": [5] * 100_000})
    assert ids.status_code == 400 and "100,000 tokens" in ids.json()["error"]["message"]


# ---------------------------------------------------------------- point 2
def test_5000_requests_leave_no_trace():
    """Finished requests are released: after 5,000 requests through the engine thread
    the engine's tables are empty and traced memory has not grown with the count."""
    from earlyexit.engine import LLMEngine
    from earlyexit.serve.engine_thread import EngineThread

    lm = tiny_lm()
    worker = EngineThread(LLMEngine(lm.model, lm.tokenizer, "depthwise", 32, 64, 10_000))
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)

    async def one(i):
        _, stream = await worker.submit(f"p{i % 97}", params, None)
        while not (await stream.get())[-1].finished:
            pass

    async def batch(n):
        await asyncio.gather(*(one(i) for i in range(n)))

    try:
        asyncio.run(batch(500))  # warm-up: caches, code paths, the executor's threads
        tracemalloc.start()
        asyncio.run(batch(500))
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(9):
            asyncio.run(batch(500))
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        e = worker.engine
        assert e.requests == {} and e._trackers == {} and e._generators == {}
        assert worker.streams == {} and e.scheduler.rows == {} and not e.scheduler.waiting
        assert e.stats["tokens"] == 5500
        # before: ~1.5 kB held per finished request (4,500 requests here: over 6 MB)
        assert grown < 500_000, f"traced memory grew by {grown:,} bytes over 4,500 requests"
    finally:
        worker.close()


# ---------------------------------------------------------------- point 3
def test_a_failed_step_fails_only_its_requests_and_the_engine_goes_on(monkeypatch):
    s = Server(max_batch=4, max_len=200)
    try:
        c = s.client()
        solo = c.completions.create(
            model="tiny",
            prompt="abc",
            max_tokens=30,
            temperature=0,
            extra_body={"ignore_eos": True},
        ).choices[0]
        runner = s.engine.runner
        real_prefill = runner.prefill
        fail_next = threading.Event()

        def prefill(*a, **k):
            if fail_next.is_set():
                fail_next.clear()
                raise RuntimeError("injected fault")
            return real_prefill(*a, **k)

        monkeypatch.setattr(runner, "prefill", prefill)
        # A streams; B's admission step raises once: B fails, A goes on untouched
        with httpx.stream(
            "POST",
            s.url + "/v1/completions",
            json={
                "prompt": "abc",
                "max_tokens": 30,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            },
            timeout=WAIT,
        ) as a:
            lines = a.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: {"))
            fail_next.set()
            b = s.post({"prompt": "xyz", "max_tokens": 5})
            rest = [ln for ln in lines if ln.startswith("data: {")]
        assert b.status_code == 500 and "injected fault" in b.json()["error"]["message"]
        events = [json.loads(x[6:]) for x in [first, *rest]]
        assert "".join(e["choices"][0]["text"] for e in events) == solo.text
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert s.health().status_code == 200
        assert "earlyexit_engine_step_errors_total 1" in httpx.get(s.url + "/metrics").text
        after = s.post({"prompt": "abc", "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        assert after.json()["choices"][0]["text"] == solo.text

        # a fault that stays: every request fails, /health turns 503 after 3 failed steps
        def broken(*a, **k):
            raise RuntimeError("broken device")

        monkeypatch.setattr(runner, "prefill", broken)
        for _ in range(3):
            r = s.post({"prompt": "q", "max_tokens": 2})
            assert r.status_code == 500 and "broken device" in r.json()["error"]["message"]
        h = s.health()
        assert h.status_code == 503 and "broken device" in h.json()["detail"]
        m = httpx.get(s.url + "/metrics").text
        assert "earlyexit_engine_step_errors_total 4" in m and "earlyexit_engine_healthy 0" in m
        monkeypatch.setattr(runner, "prefill", real_prefill)
        ok = s.post({"prompt": "abc", "max_tokens": 30, "temperature": 0, "ignore_eos": True})
        assert ok.json()["choices"][0]["text"] == solo.text  # recovered
        assert s.health().json() == {"status": "ok"}
        assert s.engine.requests == {} and s.worker.streams == {}
    finally:
        s.stop()


def test_a_stream_whose_step_fails_gets_an_error_event(monkeypatch):
    s = Server(max_batch=4, max_len=200)
    try:
        runner = s.engine.runner
        real_run = runner.run
        calls = []

        def run(*a, **k):  # the 9th block call raises: after the first tokens, mid-stream
            calls.append(1)
            if len(calls) == 9:
                raise RuntimeError("fault mid-stream")
            return real_run(*a, **k)

        monkeypatch.setattr(runner, "run", run)
        with httpx.stream(
            "POST",
            s.url + "/v1/completions",
            json={"prompt": "abc", "max_tokens": 100, "stream": True, "ignore_eos": True},
            timeout=WAIT,
        ) as r:
            rest = list(r.iter_lines())
        content = [x for x in rest if x.startswith('data: {"id"')]
        assert len(content) >= 2  # the first token (from the prefill), then two more
        errors = [json.loads(x[6:]) for x in rest if x.startswith('data: {"error"')]
        assert len(errors) == 1 and errors[0]["error"]["code"] == 500
        assert "fault mid-stream" in errors[0]["error"]["message"]
        assert "data: [DONE]" in rest  # the stream ends rather than hangs
    finally:
        s.stop()


def test_an_engine_that_cannot_continue_fails_health_and_requests(monkeypatch):
    s = Server(max_batch=2, max_len=200)
    try:

        def broken():
            raise AssertionError("scheduler state corrupted")

        monkeypatch.setattr(s.engine.scheduler, "schedule", broken)
        r = s.post({"prompt": "q", "max_tokens": 2})
        assert r.status_code == 503 and "engine stopped" in r.json()["error"]["message"]
        assert s.health().status_code == 503
        again = s.post({"prompt": "q", "max_tokens": 2})
        assert again.status_code == 503  # refused at once, not queued forever
    finally:
        s.stop()


# ---------------------------------------------------------------- point 4
def test_non_streaming_client_disconnect_aborts_its_request():
    """Before: the disconnect check ran only after 1 s without output, so a request that
    kept producing tokens ran to its end for nobody."""
    s = Server(lm=tiny_lm(max_context=2048), max_batch=2, max_len=2048)
    try:
        before = s.engine.stats["tokens"]
        body = json.dumps({"prompt": "a", "max_tokens": 2000, "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        s.wait_until(lambda: s.engine.stats["tokens"] - before >= 5, "generation to start")
        sock.close()
        s.wait_until(lambda: s.engine.occupancy()["running"] == 0, "the abort")
        assert s.engine.stats["tokens"] - before < 1000
        assert s.engine.requests == {}
    finally:
        s.stop()


# ---------------------------------------------------------------- point 6
def test_tiny_sampling_values_give_the_greedy_answer(server):
    greedy = server.post({"prompt": "def f(", "max_tokens": 8, "temperature": 0})
    want = greedy.json()["choices"][0]["text"]
    for extra in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-46, "seed": 3}):
        r = server.post({"prompt": "def f(", "max_tokens": 8, **extra})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, extra


# ---------------------------------------------------------------- point 8
def test_half_sent_requests_are_closed_and_connections_are_bounded():
    s = Server(max_batch=2, max_len=200, server_kw={"request_timeout": 2.0, "limit_concurrency": 5})
    try:
        idle = []
        for i in range(5):
            sock = socket.create_connection(("127.0.0.1", s.port))
            if i == 0:  # headers complete, half the body
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"
                )
            else:  # half a request line (slowloris)
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            idle.append(sock)
        # one over the limit: answered 503 and closed at once
        extra = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(2)]
        for sock in extra:
            sock.settimeout(WAIT)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
            sock.close()
        # the half-sent ones are closed by the server once the request timeout passes
        for sock in idle:
            sock.settimeout(WAIT)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            sock.close()
        assert s.post({"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


# ---------------------------------------------------------------- point 9
def test_presence_and_frequency_penalties_match_a_reference(server):
    """OpenAI's definition, decoded step by step with full forwards (no cache)."""
    model, tok = server.lm.model, server.lm.tokenizer
    prompt, n, pres, freq = "aaaa", 12, 0.7, 1.3
    ids = tok.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))[0, -1].double()
            for t in set(out):
                logits[t] -= freq * out.count(t) + pres
            out.append(int(logits.argmax()))
    r = server.post(
        {
            "prompt": prompt,
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
            "presence_penalty": pres,
            "frequency_penalty": freq,
        }
    )
    assert r.status_code == 200, r.text
    plain = server.post({"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == tok.decode(out)
    assert plain.json()["choices"][0]["text"] != tok.decode(out)  # the penalties mattered


# ---------------------------------------------------------------- speed: coalescing
def test_outputs_that_pile_up_go_out_as_one_event(server, monkeypatch):
    """While the event loop is busy the engine goes on; what it produced meanwhile leaves
    as one SSE event holding all of it (before: one event per token)."""
    body = {"prompt": "import", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    want = server.post(body).json()["choices"][0]["text"]
    hold, holding, go = threading.Event(), threading.Event(), threading.Event()

    def block_loop():
        holding.set()
        hold.wait(WAIT)

    runner = server.engine.runner
    real_run = runner.run

    def run(*a, **k):  # after the first token (the prefill's), wait for the loop to be held
        assert go.wait(WAIT)
        return real_run(*a, **k)

    monkeypatch.setattr(runner, "run", run)
    before = server.engine.stats["tokens"]
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=WAIT
    ) as r:
        lines = r.iter_lines()
        first = json.loads(next(ln for ln in lines if ln.startswith("data: {"))[6:])
        server.server.loop.call_soon_threadsafe(block_loop)
        assert holding.wait(WAIT)
        go.set()
        try:  # the engine finishes the request while the loop cannot run
            server.wait_until(lambda: server.engine.stats["tokens"] - before == 20, "the tokens")
        finally:
            hold.set()
        rest = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    assert len(rest) == 1 and len(first["depths"]) + len(rest[0]["depths"]) == 20
    assert first["choices"][0]["text"] + rest[0]["choices"][0]["text"] == want
    assert rest[0]["choices"][0]["finish_reason"] == "length" and "usage" in rest[0]


@pytest.mark.parametrize("fast_json", [True, False], ids=["orjson", "json"])
def test_preformatted_sse_chunks_are_the_json_they_stand_for(monkeypatch, fast_json):
    from earlyexit.serve.app import _Chunks

    if not fast_json:
        monkeypatch.setattr(protocol, "_orjson", None)
    elif protocol._orjson is None:
        pytest.skip("orjson is not installed")
    text = 'a "quote", a \\ backslash,\n a newline, </script>, \u2028 and é🤖'
    for kind in ("completion", "chat"):
        c = _Chunks("cmpl-1", 123, 'tiny "model"', kind, 4)
        raw = c.event(text, [2, 4], None)
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
        choice = (
            {"index": 0, "delta": {"content": text}, "finish_reason": None}
            if kind == "chat"
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        )
        assert json.loads(raw[6:]) == {
            "id": "cmpl-1",
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": 123,
            "model": 'tiny "model"',
            "choices": [choice],
            "depths": [2, 4],
        }


def test_metrics_and_api_key():
    s = Server(max_batch=1, max_len=200, max_queue=1, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert s.health().status_code == 200  # health needs no key
        c = s.client("sekret")
        assert (
            c.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens
            >= 1
        )

        def one(i):
            h = {"authorization": "Bearer sekret"}
            return s.post({"prompt": "y", "max_tokens": 40, "ignore_eos": True}, headers=h)

        with ThreadPoolExecutor(8) as ex:
            codes = [r.status_code for r in ex.map(one, range(8))]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        m = httpx.get(s.url + "/metrics").text
        assert "earlyexit_tokens_total" in m and 'earlyexit_token_depth_bucket{le="4"}' in m
    finally:
        s.stop()


# ---------------------------------------------------------------- the command (issue 19 too)
def test_model_name_is_the_runs_name():
    assert model_name("runs/stdlib-small-rec-exit/final") == "stdlib-small-rec-exit"
    assert model_name("runs/stdlib-small-rec-exit/final/") == "stdlib-small-rec-exit"
    assert model_name("/models/SmolLM-135M") == "SmolLM-135M"
    assert model_name("HuggingFaceTB/SmolLM-135M") == "SmolLM-135M"


def test_serve_help_shows_defaults(capsys):
    from earlyexit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for needle in (
        "(default: 127.0.0.1)",
        "(default: 8000)",
        "(default: depthwise)",
        "(default: 32)",
        "(default: 1024)",
        "(default: 30.0)",
        "(default: the run's name",
    ):
        assert needle in out, needle


def _start(model_dir, *extra):
    """`earlyexit serve` on a free port; returns the process and the start-up line."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "earlyexit",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--device",
            "cpu",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = p.stderr.readline()  # what it is doing while it loads (it says so)
    assert line.startswith("earlyexit serve: loading "), line
    line = p.stderr.readline()  # blocks until the server listens (or dies: empty line)
    return p, line


def test_serve_command_binds_loopback_prints_its_address_and_answers(tmp_path, tokenizer):
    from earlyexit.io.checkpoint import save_checkpoint

    model = make_model(vocab_size=tokenizer.vocab_size, eos_token_ids=[tokenizer.token_to_id(EOT)])
    run = save_checkpoint(model, tmp_path / "runs" / "my-run" / "final", tokenizer=tokenizer)
    p, line = _start(run)
    try:
        assert line.startswith("earlyexit serve: listening on http://127.0.0.1:"), line
        assert line.rstrip().endswith(
            ", model my-run, policy depthwise, max batch 32, strategy full"
        ), line
        url = line.split(" on ")[1].split(",")[0]
        out = httpx.post(
            url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=WAIT
        )
        assert out.status_code == 200 and out.json()["model"] == "my-run"
    finally:
        p.terminate()
        assert p.wait(timeout=WAIT) == 0  # SIGTERM is a normal stop


# ---------------------------------------------------------------- point 7
def test_sigterm_aborts_what_is_left_after_the_deadline_and_exits_0(tmp_path, tokenizer):
    """Before: in-flight requests ran to their end, and a client holding a half-sent body
    kept the server alive until the client left."""
    from earlyexit.io.checkpoint import save_checkpoint

    model = make_model(
        vocab_size=tokenizer.vocab_size,
        max_context=4096,
        eos_token_ids=[tokenizer.token_to_id(EOT)],
    )
    run = save_checkpoint(model, tmp_path / "m", tokenizer=tokenizer)
    p, line = _start(run, "--shutdown-timeout", "1", "--request-timeout", "600")
    try:
        url = line.split(" on ")[1].split(",")[0]
        port = int(url.rsplit(":", 1)[1])
        half = socket.create_connection(("127.0.0.1", port))
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{")
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json={"prompt": "a", "max_tokens": 4000, "stream": True, "ignore_eos": True},
            timeout=WAIT,
        ) as r:
            lines = r.iter_lines()
            next(ln for ln in lines if ln.startswith("data: {"))
            t = time.monotonic()
            p.send_signal(signal.SIGTERM)
            events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "abort"
        assert sum(len(e["depths"]) for e in events) < 3999
        assert p.wait(timeout=WAIT) == 0
        assert time.monotonic() - t < WAIT
        half.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
