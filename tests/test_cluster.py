"""``earlyexit serve --replicas``: engine replicas on Ray Serve behind the same API.

The Ray tests share one local Ray cluster (2 CPUs, no dashboard) and one deployment of two
1-thread replicas of a tiny model built here; the front runs under uvicorn in a thread, as
``earlyexit serve --replicas`` runs it. Answers are checked against single-process
``generate`` on the same checkpoint. Without Ray those tests skip; the engine's load
accessor and the missing-extra error are tested either way.
"""

import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

import earlyexit
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.engine import ExitMode, LLMEngine
from tests.test_server import tiny_lm

WAIT = 120  # seconds: a backstop for waits on events, never a delay
PROMPTS = ["def main(", "import os", "class A:", "x = 1", "for i in", "# note", "print(", "if x:"]


def tiny_model():
    """The server tests' tiny model with a trained-looking exit, and its tokenizer."""
    lm = tiny_lm(max_context=512)
    return lm.model, lm.tokenizer


# --------------------------------------------------------------------------- no Ray needed
def test_queued_layer_steps_is_the_work_still_to_run():
    """Full-depth requests: the accessor equals the steps the engine then runs (its own
    ``steps_run`` accounting), at every step; an exiting request is priced below full depth
    once its tokens have exited."""
    model, tok = tiny_model()
    L = model.n_steps
    engine = LLMEngine(model, tok, "continuous", max_batch=4)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 9, 3)]
    reqs = [engine.requests[engine.add_request(p, sp)] for p, sp in zip(PROMPTS, params)]
    assert engine.queued_layer_steps() == (5 + 9 + 3) * L  # nothing run yet: full depth
    owed, ran = [], []
    while engine.has_unfinished():
        owed.append(engine.queued_layer_steps())
        ran.append(sum(r.steps_run for r in reqs))
        engine.step()
    total = sum(r.steps_run for r in reqs)
    assert [total - r for r in ran] == owed
    assert engine.queued_layer_steps() == 0

    # a free request whose tokens all exit after step 2 of 4 (threshold -1: always)
    engine = LLMEngine(model, tok, "continuous", max_batch=4)
    rid = engine.add_request(
        "def f(",
        SamplingParams(max_new_tokens=20, ignore_eos=True),
        ExitMode(step=2, threshold=-1.0, deep_kv="skip"),
    )
    for _ in range(6):
        engine.step()
    req = engine.requests[rid]
    remaining = 20 - len(req.output_ids)
    assert all(d == 2 for d in req.depths[1:])
    assert remaining * 2 < engine.queued_layer_steps() < remaining * L


def test_replicas_without_ray_names_the_extra(monkeypatch, capsys, tmp_path):
    from earlyexit.cli import main
    from earlyexit.io.checkpoint import save_checkpoint

    model, tok = tiny_model()
    ckpt = save_checkpoint(model, tmp_path / "m", tokenizer=tok)
    for name in ("ray", "ray.serve"):
        monkeypatch.setitem(sys.modules, name, None)  # import ray -> ImportError
    assert main(["serve", "--model", str(ckpt), "--replicas", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("earlyexit: error: ") and "pip install 'earlyexit[cluster]'" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two engine replicas (1 thread each) on a local Ray cluster, the front on loopback."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    httpx = pytest.importorskip("httpx")
    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.serve import cluster as cl
    from earlyexit.serve.server import bound_port, make_server

    model, tok = tiny_model()
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("cluster") / "tiny", tokenizer=tok)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="error", log_to_driver=False)
    try:
        spec = cl.ReplicaSpec(
            str(ckpt),
            "tiny",
            threads=1,
            app_kw={"max_batch": 16, "max_len": 512, "allow_untrained_exits": True},
            load_kw={"device": "cpu"},
        )
        handle = cl.start(spec, 2, router="work")
        front = cl.Front(handle, 2)
        server = make_server(front, "127.0.0.1", 0, log_level="error", limit_concurrency=256)
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        assert server.ready.wait(WAIT)
        url = f"http://127.0.0.1:{bound_port(server)}"
        ref = earlyexit.load(str(ckpt), device="cpu")
        yield SimpleNamespace(url=url, ref=ref, httpx=httpx, server=server, front=front)
        server.should_exit = True
        th.join(timeout=WAIT)
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(c, body, **kw):
    return c.httpx.post(c.url + "/v1/completions", json=body, timeout=WAIT, **kw)


def _stream(c, body, on_first=None):
    """One streaming completion: (text, replica pid, final error or None)."""
    text, error = [], None
    with c.httpx.stream(
        "POST", c.url + "/v1/completions", json={**body, "stream": True}, timeout=WAIT
    ) as r:
        assert r.status_code == 200, r.read()
        pid = r.headers["x-earlyexit-replica"]
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            if on_first is not None:
                on_first(pid)
                on_first = None
            text.append(event["choices"][0]["text"])
    return "".join(text), pid, error


def _reference(c, prompt, n, **exit):
    return c.ref.generate(prompt, max_new_tokens=n, ignore_eos=True, **exit).text


def test_greedy_answers_equal_single_process_generate(cluster):
    c = cluster
    bodies = [
        {"prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True} for p in PROMPTS
    ]
    with ThreadPoolExecutor(8) as ex:
        plain = list(ex.map(lambda b: _post(c, b), bodies))
        streamed = list(ex.map(lambda b: _stream(c, b), bodies))
    for p, r, (text, _, error) in zip(PROMPTS, plain, streamed):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == _reference(c, p, 12)
        assert error is None and text == _reference(c, p, 12)
    # both replicas served (the router spreads concurrent requests)
    assert len({r.headers["x-earlyexit-replica"] for r in plain} | {s[1] for s in streamed}) == 2


def test_32_concurrent_requests_all_complete(cluster):
    c = cluster
    bodies = []
    for i in range(32):
        b = {"prompt": PROMPTS[i % 8], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        if i % 2:  # a 50/50 mix of full and free
            b.update(strategy="free", threshold=0.5)
        bodies.append(b)
    with ThreadPoolExecutor(32) as ex:
        got = list(ex.map(lambda b: _stream(c, b), bodies))
    for b, (text, _, error) in zip(bodies, got):
        assert error is None
        exit = {"strategy": "free", "threshold": 0.5} if "strategy" in b else {}
        assert text == _reference(c, b["prompt"], 24, **exit)


def test_same_errors_and_health_as_one_process(cluster):
    """The replicas run the same app: its 400s, 404s and 413s come back unchanged."""
    from fastapi.testclient import TestClient

    from earlyexit.serve.app import build_app

    c = cluster
    app = build_app(c.ref, "tiny", max_batch=4, allow_untrained_exits=True)
    with TestClient(app) as local:  # its lifespan stops the engine thread at the end
        _compare_errors(c, local)
    health = c.httpx.get(c.url + "/health", timeout=WAIT).json()
    assert health == {"status": "ok", "replicas": {"running": 2, "target": 2}}


def _compare_errors(c, local):
    bad = [
        {"prompt": "x", "max_tokens": 4, "colour": "red"},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "model": "other"},
        {"prompt": "x", "strategy": "speculative", "temperature": 1.0},
    ]
    for body in bad:
        want = local.post("/v1/completions", json=body)
        got = _post(c, body)
        assert (got.status_code, got.json()) == (want.status_code, want.json()), body
    big = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
    want = local.post("/v1/completions", content=big)
    got = c.httpx.post(c.url + "/v1/completions", content=big, timeout=WAIT)
    assert (got.status_code, got.json()) == (413, want.json())


def test_graceful_shutdown_drains_requests_in_flight(cluster):
    """A second front over the same replicas: stopped while a stream is under way, it lets
    the stream finish before it exits."""
    from earlyexit.serve.cluster import Front
    from earlyexit.serve.server import bound_port, make_server

    c = cluster
    server = make_server(
        Front(c.front.handle, 2), "127.0.0.1", 0, log_level="error", limit_concurrency=64
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    assert server.ready.wait(WAIT)
    other = SimpleNamespace(url=f"http://127.0.0.1:{bound_port(server)}", httpx=c.httpx)
    first = threading.Event()
    body = {"prompt": "def main(", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(_stream, other, body, lambda _pid: first.set())
        assert first.wait(WAIT)
        server.should_exit = True  # what SIGTERM does
        text, _, error = fut.result(timeout=WAIT)
    th.join(timeout=WAIT)
    assert not th.is_alive()
    assert error is None and text == _reference(c, "def main(", 300)


def test_a_killed_replica_fails_only_its_requests_and_is_restarted(cluster):
    c = cluster
    bodies = [
        {"prompt": PROMPTS[i], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        for i in range(8)
    ]
    pids = [None] * len(bodies)
    started = threading.Barrier(len(bodies) + 1)

    def first_tokens(i):
        def seen(pid):
            pids[i] = int(pid)
            started.wait(WAIT)

        return seen

    with ThreadPoolExecutor(len(bodies)) as ex:
        futs = [ex.submit(_stream, c, b, first_tokens(i)) for i, b in enumerate(bodies)]
        started.wait(WAIT)  # every request has its first tokens: all are in flight
        victim = pids[0]
        assert len(set(pids)) == 2  # spread over both replicas
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=WAIT) for f in futs]  # none hangs
    for b, (text, pid, error) in zip(bodies, results):
        if int(pid) != victim:  # the other replica's requests are untouched
            assert error is None and text == _reference(c, b["prompt"], 400)
        else:  # the victim's: a clear, retryable error (or done before the kill landed)
            assert error is not None or text == _reference(c, b["prompt"], 400)
            if error is not None:
                assert error["code"] == 503 and "retry" in error["message"]
    assert any(e is not None for _, _, e in results)

    # Ray restarts the replica; /health says so, and service is whole again
    deadline = time.monotonic() + WAIT
    while True:
        h = c.httpx.get(c.url + "/health", timeout=WAIT)
        if h.status_code == 200 and h.json()["status"] == "ok":
            break
        assert h.json()["replicas"]["target"] == 2
        assert time.monotonic() < deadline, h.json()
        time.sleep(0.1)
    r = _post(c, {"prompt": "x = 1", "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == _reference(c, "x = 1", 8)
