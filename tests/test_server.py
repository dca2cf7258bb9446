"""The OpenAI-compatible server, driven by the real `openai` client on loopback."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import earlyexit  # noqa: E402
from earlyexit.serve.app import build_app  # noqa: E402
from earlyexit.tokenizer import EOT, byte_level_tokenizer  # noqa: E402
from tests.conftest import make_model  # noqa: E402

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"


class Server:
    def __init__(self, **kw):
        tok = byte_level_tokenizer()
        model = make_model(
            vocab_size=tok.vocab_size,
            n_layers=4,
            max_context=256,
            eos_token_ids=[tok.token_to_id(EOT)],
            exits={"steps": [2], "trained": True},
        )
        self.app = build_app(earlyexit.LM(model, tok), "tiny", chat_template=TEMPLATE, **kw)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.engine = self.app.state.worker.engine

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    s = Server(max_batch=4, max_len=200)
    yield s
    s.stop()


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
            model="tiny", prompt="import os", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
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
        )
    )
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content
    ids = c.completions.create(model="tiny", prompt=[100, 101, 102], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3
    assert [m.id for m in c.models.list().data] == ["tiny"]


@pytest.mark.parametrize(
    "body, status, needle",
    [
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
        (
            json.dumps({"prompt": "x", "strategy": "free", "threshold": 3}).encode(),
            400,
            "threshold",
        ),
        (json.dumps({"prompt": "x" * 300}).encode(), 400, "exceeds the context"),
        (b'{"prompt": "\\ud800 lone surrogate"}', None, None),
        (b"\xff\xfe bad utf-8", 400, "not valid JSON"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, needle):
    r = httpx.post(
        server.url + "/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    if status is None:  # unusual but valid JSON: served or refused cleanly, never a 500
        assert r.status_code in (200, 400)
        return
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status
    # the server keeps serving
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


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


def test_client_disconnect_frees_the_slot(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "a", "max_tokens": 150, "stream": True, "ignore_eos": True},
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    for _ in range(100):
        if server.engine.occupancy()["running"] == 0:
            break
        time.sleep(0.05)
    assert server.engine.occupancy()["running"] == 0
    assert any(q.status.value == "abort" for q in server.engine.requests.values())


def test_metrics_and_api_key():
    s = Server(max_batch=1, max_len=200, max_queue=1, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
        c = s.client("sekret")
        assert (
            c.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens
            >= 1
        )

        def one(i):
            h = {"authorization": "Bearer sekret"}
            return httpx.post(
                s.url + "/v1/completions",
                json={"prompt": "y", "max_tokens": 40, "ignore_eos": True},
                headers=h,
                timeout=60,
            )

        with ThreadPoolExecutor(8) as ex:
            codes = [r.status_code for r in ex.map(one, range(8))]
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
        m = httpx.get(s.url + "/metrics").text
        assert "earlyexit_tokens_total" in m and 'earlyexit_token_depth_bucket{le="4"}' in m
    finally:
        s.stop()


def test_serve_command_binds_loopback_and_answers(tiny_lm_dir):
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "earlyexit",
            "serve",
            "--model",
            str(tiny_lm_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(200):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.json() == {"status": "ok"}
        out = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"prompt": "hi", "max_tokens": 3},
            timeout=30,
        )
        assert out.status_code == 200 and out.json()["model"] == tiny_lm_dir.name
    finally:
        p.terminate()
        p.wait(timeout=20)
