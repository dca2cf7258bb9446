"""Every strategy through the HTTP server (issue 29), driven by the real `openai` client
with the request fields in ``extra_body``: each answer equals what the same strategy gives
alone (speculation: greedy full depth), also when requests of different strategies are in
flight together; each new field is validated with a 400 that names it."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import earlyexit  # noqa: E402
from earlyexit.decoding.calm import CALM  # noqa: E402
from earlyexit.decoding.free import FREE  # noqa: E402
from earlyexit.decoding.generate import generate  # noqa: E402
from earlyexit.decoding.sampling import SamplingParams  # noqa: E402
from earlyexit.errors import InputError  # noqa: E402
from earlyexit.serve.app import build_app  # noqa: E402
from earlyexit.serve.protocol import Defaults  # noqa: E402
from earlyexit.tokenizer import EOT, byte_level_tokenizer  # noqa: E402
from tests.conftest import make_model  # noqa: E402
from tests.test_server import Server  # noqa: E402

PROMPTS = ["import os", "def f(x):", "class A:", "# a comment", "x = 1", "for i in"]


def lm_with_exits(trained=True):
    tok = byte_level_tokenizer()
    model = make_model(
        vocab_size=tok.vocab_size,
        n_layers=6,
        max_context=256,
        eos_token_ids=[tok.token_to_id(EOT)],
        exits={"steps": [2, 4], "trained": trained},
        init_std=0.2,
    )
    return earlyexit.LM(model, tok)


@pytest.fixture(scope="module")
def server():
    # every adaptive round drafts: the default gate decides by measured time (tests may not)
    s = Server(lm_with_exits(), max_batch=4, max_len=200, draft_gate="always")
    yield s
    s.server.should_exit = True
    s.thread.join(30)


def reference(lm, prompt, n, strategy=None):
    ids = lm.tokenizer.encode(prompt)
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    res = generate(lm.model, [ids], params, lm.tokenizer, strategy)[0]
    return res.text, res.depths


CASES = [
    ({"strategy": "full"}, lambda: None),
    ({"strategy": "speculative", "draft_tokens": 3}, lambda: None),  # == full depth
    ({"strategy": "speculative", "exit_step": 4}, lambda: None),
    ({"strategy": "free", "threshold": 0.02}, lambda: FREE(2, 0.02)),
    (
        {"strategy": "free", "threshold": 0.02, "confidence": "max-prob"},
        lambda: FREE(2, 0.02, measure="max-prob"),
    ),
    ({"strategy": "calm", "threshold": 0.03}, lambda: CALM(0.03, 2)),
    (
        {"strategy": "calm", "threshold": 0.03, "deep_kv": "skip"},
        lambda: CALM(0.03, 2, deep_kv="skip"),
    ),
]


def ask(c, prompt, fields, n=12, **kw):
    return c.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=n,
        extra_body={"ignore_eos": True, **fields},
        **kw,
    )


@pytest.mark.parametrize("fields, strategy", CASES)
def test_each_strategy_equals_its_own_single_request_run(server, fields, strategy):
    c = server.client()
    kw = {} if fields["strategy"] == "speculative" else {"temperature": 0}
    r = ask(c, PROMPTS[0], fields, **kw)  # speculative: no temperature means greedy
    text, depths = reference(server.lm, PROMPTS[0], 12, strategy())
    assert r.choices[0].text == text
    usage = r.usage.model_dump()
    assert usage["strategy"] == fields["strategy"]
    assert usage["average_depth"] == pytest.approx(sum(depths) / len(depths))
    assert usage["exited_tokens"] == sum(d < 6 for d in depths)
    if fields["strategy"] == "speculative":
        assert 0 <= usage["accepted_tokens"] <= usage["drafted_tokens"]
        assert usage["drafted_tokens"] > 0
    else:
        assert usage["drafted_tokens"] == 0


def test_requests_of_every_strategy_in_flight_together(server):
    """Concurrent clients, one strategy each, sharing the engine's steps: every answer is
    still its own single-request run."""
    c = server.client()
    jobs = [(p, CASES[i % len(CASES)]) for i, p in enumerate(PROMPTS * 2)]

    def one(job):
        prompt, (fields, _) = job
        kw = {} if fields["strategy"] == "speculative" else {"temperature": 0}
        return ask(c, prompt, fields, n=10, **kw).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(one, jobs))
    for (prompt, (_, strategy)), text in zip(jobs, got):
        assert text == reference(server.lm, prompt, 10, strategy())[0], prompt


def test_streamed_speculation_equals_the_whole_answer(server):
    c = server.client()
    fields = {"strategy": "speculative", "draft_tokens": 4}
    whole = ask(c, PROMPTS[1], fields, n=16).choices[0].text
    chunks = list(ask(c, PROMPTS[1], fields, n=16, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole


BAD = [
    ({"strategy": "fast"}, "strategy"),
    ({"strategy": "free", "threshold": "high"}, "threshold"),
    ({"strategy": "calm", "threshold": "adaptive"}, "threshold"),
    ({"strategy": "free", "confidence": "vibes"}, "confidence"),
    ({"strategy": "free", "confidence": "classifier"}, "confidence"),  # no classifiers here
    ({"strategy": "free", "draft_tokens": 2}, "draft_tokens"),
    ({"strategy": "speculative", "threshold": 0.5}, "threshold"),
    ({"strategy": "speculative", "confidence": "margin"}, "confidence"),
    ({"strategy": "speculative", "draft_tokens": 0}, "draft_tokens"),
    ({"strategy": "speculative", "draft_tokens": True}, "draft_tokens"),
    ({"strategy": "speculative", "temperature": 0.8}, "temperature"),
    ({"strategy": "speculative", "presence_penalty": 0.5}, "presence_penalty"),
    ({"strategy": "free", "exit_step": 6}, "exit_step"),
    ({"strategy": "free", "threshold": "adaptive", "deep_kv": "skip"}, "threshold"),
    ({"strategy": "calm", "deep_kv": "catch-up"}, "deep_kv"),
    ({"strategy": "full", "draft_tokens": 2}, "draft_tokens"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_each_new_field_is_validated_with_a_400_naming_it(server, fields, param):
    body = {"prompt": "x", "max_tokens": 2, **fields}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_untrained_exits_are_refused_unless_the_server_allows_them():
    s = Server(lm_with_exits(trained=False), max_batch=2, max_len=200)
    try:
        body = {"prompt": "x", "max_tokens": 2, "strategy": "free", "threshold": 0.1}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "exit_step"
        assert "--allow-untrained-exits" in r.json()["error"]["message"]
        spec = {"prompt": "x", "max_tokens": 2, "strategy": "speculative"}  # exact: served
        assert httpx.post(s.url + "/v1/completions", json=spec, timeout=60).status_code == 200
    finally:
        s.server.should_exit = True
        s.thread.join(30)
    s = Server(lm_with_exits(trained=False), max_batch=2, max_len=200, allow_untrained_exits=True)
    try:
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        s.server.should_exit = True
        s.thread.join(30)


def test_server_defaults_apply_and_a_bad_default_is_refused_at_start():
    lm = lm_with_exits()
    s = Server(lm, max_batch=2, max_len=200, defaults=Defaults("free", threshold=0.02))
    try:
        c = s.client()
        r = ask(c, PROMPTS[2], {}, temperature=0)  # no strategy: the server's free
        assert r.choices[0].text == reference(lm, PROMPTS[2], 12, FREE(2, 0.02))[0]
        assert r.usage.model_dump()["strategy"] == "free"
        r = ask(c, PROMPTS[2], {"draft_tokens": 2})  # a draft field alone: speculative
        assert r.usage.model_dump()["strategy"] == "speculative"
        assert r.choices[0].text == reference(lm, PROMPTS[2], 12)[0]
    finally:
        s.server.should_exit = True
        s.thread.join(30)
    with pytest.raises(InputError, match=r"default strategy.*exit step 9"):
        build_app(lm, "m", max_batch=1, max_len=64, defaults=Defaults("free", exit_step=9))
    with pytest.raises(InputError, match=r"default strategy.*classifier"):
        build_app(
            lm, "m", max_batch=1, max_len=64, defaults=Defaults("calm", confidence="classifier")
        )


def test_an_adaptive_threshold_is_fitted_per_served_model(server):
    """``threshold: "adaptive"``: FREE's Beta mixture, one per served model and exit step,
    fed by every request's catch-ups (docs/decisions.md says why not per request)."""
    c = server.client()
    for p in PROMPTS[:3]:
        ask(c, p, {"strategy": "free", "threshold": "adaptive"}, n=8, temperature=0)
    cal = server.engine._calibrators[(2, "margin")]
    assert cal.sequences == 3
    assert json.loads(json.dumps(cal.state()))["sequences"] == 3  # reported as JSON


def test_the_server_measures_draft_prices_at_start_not_in_the_first_request(monkeypatch):
    """Adaptive speculation prices drafts from timed full-depth forwards; measured inside
    the first speculative request, that would stall every running request for seconds (3.5 s
    on SmolLM2), so a server measures at start (``prepare_speculation``), and speculative
    requests never measure again; a model that cannot speculate measures nothing."""
    from earlyexit.engine import ExitMode, LLMEngine

    lm = lm_with_exits()
    app = build_app(lm, "tiny", max_batch=2, max_len=64)
    try:
        assert app.state.worker.engine._forward_times is not None
    finally:
        app.state.worker.close()

    def again(*a, **k):
        raise AssertionError("measured during a request")

    engine = LLMEngine(lm.model, policy="depthwise", max_batch=2, max_len=64)
    engine.prepare_speculation()
    measured = dict(engine._forward_times)
    monkeypatch.setattr(engine, "_measure_forwards", again)
    engine.prepare_speculation()  # once only
    ids = lm.tokenizer.encode("def f(x):")
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0)
    rids = [engine.add_request(ids, params, ExitMode(strategy="speculative")) for _ in range(2)]
    reqs = [engine.requests[r] for r in rids]
    while engine.has_unfinished():
        engine.step()
    assert all(len(r.output_ids) == 8 for r in reqs) and engine._forward_times == measured
    plain = make_model(vocab_size=300, n_layers=2, max_context=64)  # no exit, no draft
    monkeypatch.setattr(LLMEngine, "_measure_forwards", again)
    LLMEngine(plain, policy="depthwise", max_batch=2, max_len=32).prepare_speculation()
