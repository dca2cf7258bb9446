"""The serving engine: scheduler invariants (pure Python), and every policy and model kind
producing exactly what single-request decoding produces."""

import random
import warnings

import pytest
import torch

from earlyexit.config import LoraConfig
from earlyexit.decoding.free import FREE
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.strategies import ExitWarning
from earlyexit.engine import ExitMode, QueueFull, Scheduler
from earlyexit.engine import LLMEngine as _LLMEngine
from earlyexit.errors import InputError
from earlyexit.models.recursive import convert_recursive
from earlyexit.plan import build_plan
from tests.conftest import make_model

warnings.filterwarnings("ignore", category=ExitWarning)


def LLMEngine(*args, **kwargs):
    """The engine on these random-weight models, whose exits were never trained: exits are
    allowed (the tests compare decisions, not quality)."""
    kwargs.setdefault("allow_untrained_exits", True)
    return _LLMEngine(*args, **kwargs)


# ---------------------------------------------------------------------- scheduler only
def simulate(policy, plan, ls=None, max_batch=4, n_requests=30, seed=0, abort_rate=0.0):
    """Drive a Scheduler with a fake executor; check its invariants as it runs."""
    rng = random.Random(seed)
    blocks = [s.block for s in plan]
    L = len(plan)
    s = Scheduler(policy, max_batch, blocks)
    pending = [f"r{i}" for i in range(n_requests)]
    budget = {r: rng.randint(1, 6) for r in pending}  # tokens each request generates
    passes, depth_of_token, waits = {}, [], {}
    live = set()
    steps = 0
    while pending or live or s.num_waiting:
        steps += 1
        assert steps < 20_000, "no progress"
        for _ in range(rng.randint(0, 3)):  # random arrivals
            if pending:
                r = pending.pop(0)
                s.add(r)
                live.add(r)
        if abort_rate and live and rng.random() < abort_rate:  # random aborts
            victim = rng.choice(sorted(live))
            s.finish(victim)
            live.discard(victim)
        out = s.schedule()
        if policy != "static":  # no idle slot while work is queued
            assert s.num_waiting == 0 or s.num_running == max_batch
        for rid, _ in out.admit:  # prefill emits the first token at full depth
            budget[rid] -= 1
            if budget[rid] == 0:
                s.finish(rid)
                live.discard(rid)
            else:
                s.set_segment(rid, 0, ls or L)
                passes[rid] = 0
        for rid in list(s.cursors):
            waits[rid] = waits.get(rid, 0) + 1
        for rid, a, b in out.run:
            passes[rid] += b - a
            waits[rid] = 0
            s.advance(rid, b)
            if b < s.cursors[rid].end:
                continue
            if ls is not None and b == ls and rng.random() < 0.5:  # goes deep
                s.set_segment(rid, ls, L)
                continue
            depth_of_token.append((passes[rid], b))  # token emitted after `passes` steps
            passes[rid] = 0
            budget[rid] -= 1
            if budget[rid] == 0:
                s.finish(rid)
                live.discard(rid)
            else:
                s.set_segment(rid, 0, ls or L)
        assert all(w <= 2 * s.max_wait + 2 for rid, w in waits.items() if rid in s.cursors), (
            "starved"
        )
    return depth_of_token, s


@pytest.mark.parametrize("policy", ["static", "continuous", "depthwise"])
@pytest.mark.parametrize(
    "plan", [build_plan(6), build_plan(6, "cycle", 3), build_plan(8, "middle_cycle", 3)]
)
@pytest.mark.parametrize("ls", [None, 2])
def test_scheduler_invariants(policy, plan, ls):
    for seed in range(3):
        tokens, s = simulate(policy, plan, ls, seed=seed, abort_rate=0.05)
        # every token ran exactly its depth's block passes
        assert all(p == d for p, d in tokens)
        assert s.num_running == 0 and s.num_waiting == 0
        assert sorted(s.free_rows) == list(range(s.max_batch))


def test_depthwise_groups_steps_of_one_block_across_loops():
    s = Scheduler(
        "depthwise", 8, [s.block for s in build_plan(6, "cycle", 3)]
    )  # blocks 0,1,0,1,0,1
    for i in range(3):
        s.add(f"r{i}")
    out = s.schedule()
    for (rid, _), start in zip(out.admit, (0, 2, 4)):  # rows at loops 0, 1, 2, all before block 0
        s.set_segment(rid, start, 6)
    out = s.schedule()
    assert out.block == 0 and sorted(a for _, a, _ in out.run) == [0, 2, 4]


def test_static_admits_only_an_empty_batch():
    s = Scheduler("static", 2, [0, 1])
    for i in range(3):
        s.add(f"r{i}")
    assert [r for r, _ in s.schedule().admit] == ["r0", "r1"]
    s.finish("r0")
    assert s.schedule().admit == []  # r1 still runs: the static batch is not refilled
    s.finish("r1")
    assert [r for r, _ in s.schedule().admit] == ["r2"]


# ---------------------------------------------------------------------- the real engine
def prompts(n=7, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def models():
    # Built at collection: seed here so the models do not depend on what earlier-collected
    # modules drew from the global RNG (a clean CI clone collects a different set).
    torch.manual_seed(0)
    dense = make_model(n_layers=6, exits={"steps": [2], "trained": True}, init_std=0.3)
    rec = convert_recursive(make_model(n_layers=6, init_std=0.3), 2, init="average")  # 3 blocks x 2
    relaxed = convert_recursive(
        make_model(n_layers=6, init_std=0.3), 2, init="average", lora=LoraConfig(rank=4)
    )
    mid = convert_recursive(
        make_model(n_layers=8, init_std=0.3), 3, "middle_cycle", "average", LoraConfig(rank=2)
    )
    # relaxed norms and biases (a Qwen2-style source), offsets made non-trivial
    qwen = make_model(n_layers=6, init_std=0.3, qkv_bias=True)
    relaxed_nb = convert_recursive(
        qwen, 2, init="average", lora=LoraConfig(rank=2, norms=True, biases=True)
    )
    with torch.no_grad():
        for b in relaxed_nb.blocks:
            for p in [*b.lora.norm.values(), *b.lora.bias.values()]:
                p.normal_(0, 0.1)
    return {
        "dense": (dense, 2),
        "recursive": (rec, 3),
        "relaxed": (relaxed, 3),
        "relaxed-norms-biases": (relaxed_nb, 3),
        "middle": (mid, 3),
    }


MODELS = models()
LENGTHS = [3, 9, 5, 12, 1, 7, 10]  # tokens each of prompts() generates


def serve_prompts(engine, exit=None):
    """Serve prompts() (LENGTHS tokens each) to completion; the requests, in prompt order."""
    reqs = [
        engine.requests[
            engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True), exit)
        ]
        for p, n in zip(prompts(), LENGTHS)
    ]
    while engine.has_unfinished():
        engine.step()
    return reqs


def assert_each_request_alone(model, reqs, strategy):
    """Each served request equals decoding its prompt alone with ``strategy()``: tokens and
    depths."""
    for req, p, n in zip(reqs, prompts(), LENGTHS):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        ref = generate(model, [p], params, strategy=strategy())[0]
        assert req.output_ids == ref.token_ids and req.depths == ref.depths, req.request_id


@pytest.mark.parametrize("policy", ["static", "continuous", "depthwise"])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("threshold", [None, 0.05])
def test_engine_equals_single_request_decoding(policy, kind, threshold):
    model, exit_step = MODELS[kind]
    engine = LLMEngine(model, policy=policy, max_batch=3, max_len=64)
    reqs = serve_prompts(engine, None if threshold is None else ExitMode(exit_step, threshold))
    assert_each_request_alone(
        model, reqs, lambda: None if threshold is None else FREE(exit_step, threshold)
    )
    if threshold is not None:
        depths = {d for req in reqs for d in req.depths[1:]}
        assert len(depths) > 1, "some tokens should exit and others not"
    assert engine.occupancy()["running"] == 0


def test_depthwise_shares_block_calls_across_depths():
    model, k = MODELS["recursive"]
    dw = LLMEngine(model, policy="depthwise", max_batch=8, max_len=64)
    dw.generate(prompts(8), SamplingParams(max_new_tokens=12, ignore_eos=True), ExitMode(k, 0.05))
    cont = LLMEngine(model, policy="continuous", max_batch=8, max_len=64)
    cont.generate(prompts(8), SamplingParams(max_new_tokens=12, ignore_eos=True), ExitMode(k, 0.05))
    # depth-wise: fewer block calls for the same work, because rows at loop 1 and loop 2 of
    # a block share a call
    assert dw.occupancy()["block_calls"] < cont.occupancy()["block_calls"]
    assert dw.occupancy()["mean_rows_per_block_call"] > cont.occupancy()["mean_rows_per_block_call"]


def test_streaming_outputs_abort_and_bad_input(tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size, n_layers=4)
    engine = LLMEngine(model, tokenizer, policy="depthwise", max_batch=2, max_len=64, max_queue=3)
    a = engine.add_request("def f(", SamplingParams(max_new_tokens=6, ignore_eos=True))
    b = engine.add_request("import os", SamplingParams(max_new_tokens=40, ignore_eos=True))
    reqs = {a: engine.requests[a], b: engine.requests[b]}
    texts = {a: "", b: ""}
    aborted = False
    while engine.has_unfinished():
        for ev in engine.step():
            texts[ev.request_id] += ev.text or ""
            if ev.request_id == b and len(ev.request.output_ids) == 5 and not aborted:
                assert engine.abort(b)
                aborted = True
    assert texts[a] == reqs[a].text and len(reqs[a].output_ids) == 6
    assert reqs[b].status.value == "abort" and len(reqs[b].output_ids) == 5
    assert engine.occupancy()["running"] == 0 and not engine.abort(b)
    assert engine.requests == {}  # finished and aborted requests are released
    with pytest.raises(InputError, match="empty"):
        engine.add_request("")
    with pytest.raises(InputError, match="exceeds the context"):
        engine.add_request([1] * 60, SamplingParams(max_new_tokens=10))
    short = SamplingParams(max_new_tokens=5)
    with pytest.raises(InputError, match="exit step"):
        engine.add_request([1], short, exit=ExitMode(9, 0.5))
    for _ in range(3):
        engine.add_request([1, 2], short)
    with pytest.raises(QueueFull):
        engine.add_request([1, 2], short)


def test_seeded_sampling_in_the_engine_is_per_request():
    model, _ = MODELS["dense"]
    p = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, ignore_eos=True)
    e1 = LLMEngine(model, policy="depthwise", max_batch=4, max_len=64)
    r1 = e1.generate([[1, 2, 3], [4, 5]], p)
    e2 = LLMEngine(model, policy="continuous", max_batch=1, max_len=64)
    r2 = e2.generate([[1, 2, 3], [4, 5]], p)
    assert [r.output_ids for r in r1] == [r.output_ids for r in r2]


def test_compute_accounting_counts_catch_up_work():
    model, k = MODELS["recursive"]
    e = LLMEngine(model, policy="depthwise", max_batch=4, max_len=64)
    full = e.generate(prompts(3), SamplingParams(max_new_tokens=10, ignore_eos=True))
    for r in full:
        assert r.steps_run == 6 * len(r.output_ids)
    e = LLMEngine(model, policy="depthwise", max_batch=4, max_len=64)
    ex = e.generate(
        prompts(3), SamplingParams(max_new_tokens=10, ignore_eos=True), ExitMode(k, 0.05)
    )
    for r in ex:
        n_exit = sum(d < 6 for d in r.depths)
        # every token runs the 3 shallow steps; deep steps run for deep tokens and for the
        # exited tokens caught up by a later deep pass
        assert 3 * len(r.depths) + 3 * (len(r.depths) - n_exit) <= r.steps_run <= 6 * len(r.depths)
    assert sum(r.steps_run for r in ex) < sum(r.steps_run for r in full)


def mor_models():
    """Every routing variant of the reference tests: default routers, the auxiliary router
    (it, not the main router, decides at inference), the token-choice loss-free bias,
    ``replace`` gating with tanh and MLP routers, KV sharing."""
    from tests.test_mor import ref_model

    names = ["expert", "expert-aux-router", "expert-replace-tanh", "expert-mlp-capacities"]
    names += ["expert-kv-sharing", "token", "token-bias"]
    return {f"mor-{v}": ref_model(v) for v in names}


MOR_MODELS = mor_models()


@pytest.mark.parametrize("policy", ["static", "continuous", "depthwise"])
@pytest.mark.parametrize("kind", list(MOR_MODELS))
def test_engine_serves_mor_models_exactly(policy, kind):
    model = MOR_MODELS[kind]
    ps = prompts(6, seed=4)
    lengths = [4, 9, 6, 2, 8, 5]
    engine = LLMEngine(model, policy=policy, max_batch=3, max_len=64)
    reqs = [
        engine.requests[engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))]
        for p, n in zip(ps, lengths)
    ]
    while engine.has_unfinished():
        engine.step()
    depths = set()
    for req, p, n in zip(reqs, ps, lengths):
        ref = generate(model, [p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
        assert req.output_ids == ref.token_ids, (kind, policy)
        assert req.depths == ref.depths
        depths |= set(ref.depths)
    assert len(depths) > 1  # the routers give tokens different depths


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_synthetic_exits_follow_their_draws_under_every_policy(rate):
    """bench depthwise --synthetic: a token exits iff its drawn number falls under the rate,
    the same draws under every policy (a fixed function of request and token index)."""
    from earlyexit.engine import SyntheticDepth

    model, ls = MODELS["recursive"]
    syn = SyntheticDepth(exit_rate=rate, seed=3)
    ps, n = prompts(6, seed=5), 7
    per_policy = {}
    for policy in ("static", "continuous", "depthwise"):
        engine = LLMEngine(model, policy=policy, max_batch=3, max_len=64, synthetic=syn)
        rids = [
            engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True), ExitMode(ls))
            for p in ps
        ]
        reqs = [engine.requests[r] for r in rids]
        while engine.has_unfinished():
            engine.step()
        per_policy[policy] = [r.depths for r in reqs]
        for rid, r in zip(rids, reqs):
            # the first token comes from the prefill (full depth); token i >= 1 is checked
            want = [model.n_steps] + [
                ls if syn.uniform(rid, i) < rate else model.n_steps for i in range(1, n)
            ]
            assert r.depths == want
    assert per_policy["static"] == per_policy["continuous"] == per_policy["depthwise"]


def test_synthetic_mor_depths_follow_their_draws():
    from earlyexit.engine import SyntheticDepth
    from earlyexit.models.mor import recursion_ranges

    model = MOR_MODELS["mor-token"]
    prefix, recs, suffix = recursion_ranges(model.plan)
    shares = tuple([1 / len(recs)] * len(recs))
    syn = SyntheticDepth(mor_shares=shares, seed=1)
    engine = LLMEngine(model, policy="depthwise", max_batch=3, max_len=64, synthetic=syn)
    rids = [
        engine.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True))
        for p in prompts(5, seed=2)
    ]
    reqs = [engine.requests[r] for r in rids]
    while engine.has_unfinished():
        engine.step()
    fixed = len(prefix) + len(suffix)
    for rid, r in zip(rids, reqs):
        want = [fixed + syn.recursions(rid, i) * len(recs[0]) for i in range(1, 6)]
        assert r.depths[1:] == want
    with pytest.raises(InputError, match="mor_shares"):
        LLMEngine(MODELS["recursive"][0], synthetic=SyntheticDepth(mor_shares=shares))
    with pytest.raises(InputError, match="exit_rate"):
        SyntheticDepth(exit_rate=1.5)


@pytest.mark.parametrize("policy", ["continuous", "depthwise"])
@pytest.mark.parametrize("kind", ["dense", "relaxed"])
def test_engine_with_a_pruned_exit_head_equals_single_request_free(policy, kind):
    """``exit_vocab``: the engine's exit decisions over a token subset equal FREE's with the
    same subset, request by request; exited tokens are in the subset."""
    model, exit_step = MODELS[kind]
    allowed = torch.tensor(random.Random(1).sample(range(model.config.vocab_size), 24))
    engine = LLMEngine(model, policy=policy, max_batch=3, max_len=64, exit_vocab=allowed)
    reqs = serve_prompts(engine, ExitMode(exit_step, 0.3))
    assert_each_request_alone(model, reqs, lambda: FREE(exit_step, 0.3, exit_vocab=allowed))
    depths = set()
    for req in reqs:
        for tok, d in zip(req.output_ids, req.depths):
            if d == exit_step:
                assert tok in allowed.tolist()
        depths |= set(req.depths[1:])
    assert len(depths) > 1, "some tokens should exit and others not"
    with pytest.raises(InputError, match="exit_vocab"):
        LLMEngine(model, exit_vocab=[3, 3])


def test_runner_logits_share_one_head_and_match_each_exit_point(monkeypatch):
    """Rows at an exit point and at the end in one call: each row's logits are its own exit's
    (exit norm + head) or the final ones, computed row by row as the reference; and the
    full head runs once for all of them."""
    model = make_model(
        n_layers=6, exits={"steps": [2], "norms": True, "trained": True}, init_std=0.3
    )
    with torch.no_grad():
        model.exit_norms[0].weight.normal_(1.0, 0.5)
    engine = LLMEngine(model, policy="depthwise", max_batch=4, max_len=32)
    runner = engine.runner
    h = torch.randn(4, model.config.d_model)
    runner.hbuf[:4, 0] = h
    runner.hlen[:4] = 1
    steps = [2, 6, 2, 6]
    heads = []
    from earlyexit.engine import runner as runner_mod

    orig = runner_mod.linear
    monkeypatch.setattr(
        runner_mod, "linear", lambda x, w, b=None: heads.append(w.shape) or orig(x, w, b)
    )
    got = runner.logits([0, 1, 2, 3], steps)
    assert heads == [model.head_weight().shape]
    with torch.inference_mode():
        for i, s in enumerate(steps):
            want = model.exit_logits(h[i : i + 1], s) if s < 6 else model.logits(h[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["relaxed", "middle"])
def test_depthwise_engine_with_row_by_row_attention_equals_single_requests(kind):
    """The per-row attention path (chosen for long histories) through the whole engine:
    FREE catch-up chunks (several tokens per row) and rows at 2-3 loops per call."""
    model, exit_step = MODELS[kind]
    engine = LLMEngine(model, policy="depthwise", max_batch=3, max_len=64)
    engine.runner.cache.attention = "per-row"  # what the engine's cache asks of depth-wise calls
    reqs = serve_prompts(engine, ExitMode(exit_step, 0.05))
    assert_each_request_alone(model, reqs, lambda: FREE(exit_step, 0.05))


def test_depthwise_attention_mode_follows_history_length_and_slots():
    """auto: the decode kernel for one token per row where it is built; on PyTorch's paths,
    per-row once (distinct slots - 1) x the longest history reaches the floor."""
    import numpy as np

    from earlyexit.models import attention
    from earlyexit.models.kv_cache import KVCache

    model, _ = MODELS["recursive"]
    caches = {a: KVCache.for_model(model, 4, 600, attention=a) for a in ("auto", "sdpa")}
    pos = torch.zeros(4, 1, dtype=torch.long)
    floor = attention.PER_ROW_MIN_ENTRIES
    for lens, slots, want in (
        ([3, 5, 2, 4], [0, 3, 0, 3], "per-slot"),
        ([floor - 1, 5, 2, 4], [0, 3, 0, 3], "per-row"),  # floor - 1 + the new token
        ([floor - 2, 5, 2, 4], [0, 3, 0, 3], "per-slot"),
        ([floor // 2, 5, 2, 4], [0, 3, 0, 3], "per-slot"),  # 2 slots: 1 extra pass
    ):
        got = {}
        for name, cache in caches.items():
            cache.lengths[:] = 0
            cache.lengths[np.array(slots), np.arange(4)] = lens
            with torch.inference_mode():
                ctx = model.context(pos, cache, rows=np.arange(4), kv_slots=slots)
            got[name] = ctx.backend
        assert got["sdpa"] == want, (lens, slots)
        kernel = caches["auto"].kernel is not None
        assert got["auto"] == ("kernel" if kernel else want)


@pytest.mark.parametrize("policy", ["continuous", "depthwise"])
@pytest.mark.parametrize("kind", ["dense", "relaxed", "middle"])
@pytest.mark.parametrize("deep_kv", ["propagate", "skip"])
def test_engine_exits_without_catch_up_equal_single_request_calm(policy, kind, deep_kv):
    """``ExitMode.deep_kv``: an exited token's skipped steps get its exit state's K/V now
    (propagate) or nothing (skip); each request equals single-request CALM with one exit
    point and the same choice. Without a catch-up, every token runs exactly its depth."""
    import dataclasses

    from earlyexit.decoding.calm import CALM

    model, exit_step = MODELS[kind]
    engine = LLMEngine(model, policy=policy, max_batch=3, max_len=64)
    reqs = serve_prompts(engine, ExitMode(exit_step, 0.05, deep_kv))
    exits_before = model.config.exits
    # CALM checks every exit point from min_exit on: give it exactly this one
    model.config.exits = dataclasses.replace(exits_before, steps=(exit_step,))
    try:
        assert_each_request_alone(model, reqs, lambda: CALM(0.05, exit_step, deep_kv=deep_kv))
    finally:
        model.config.exits = exits_before
    for req in reqs:  # work: the prefill's steps, then each token its own depth (no catch-up)
        assert req.steps_run == model.n_steps + sum(req.depths[1:])
    assert len({d for req in reqs for d in req.depths[1:]}) > 1
    with pytest.raises(InputError, match="deep_kv"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=2), ExitMode(exit_step, 0.1, "x"))


def test_depthwise_runs_rows_at_one_step_to_their_nearest_segment_end_at_once():
    """Nothing to interleave when every ready row is at the same step: one iteration runs
    them to the nearest segment end (one block per iteration would only add overhead); rows
    at different steps go back to one block per iteration."""
    s = Scheduler("depthwise", 4, [0, 1, 2, 3, 4, 5])
    for r in ("a", "b", "c"):
        s.add(r)
    s.schedule()  # admits all three
    s.set_segment("a", 0, 6)
    s.set_segment("b", 0, 2)
    s.set_segment("c", 0, 6)
    out = s.schedule()
    assert sorted(out.run) == [("a", 0, 2), ("b", 0, 2), ("c", 0, 2)] and out.block is None
    for rid, _, stop in out.run:
        s.advance(rid, stop)
    s.set_segment("b", 0, 6)  # b starts a new token: a and c are at step 2
    out = s.schedule()
    assert out.block is not None and all(b - a == 1 for _, a, b in out.run)
