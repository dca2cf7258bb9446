"""Property tests (hypothesis): invariants under arbitrary inputs, not hand-picked cases.

- the tokenizers round-trip any text;
- the scheduler keeps its invariants under random arrivals, aborts, exits and batch sizes;
- FREE's KV-cache length bookkeeping holds under any exit pattern.
"""

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from earlyexit.decoding import free as free_mod
from earlyexit.decoding.free import FREE
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.plan import build_plan
from earlyexit.tokenizer import EOT, byte_level_tokenizer
from earlyexit.training.tokenizer import train_bpe
from tests.conftest import make_model
from tests.test_engine import simulate
from tests.test_exits import _Scripted

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bpe():
    text = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "naïve café ✓ 日本語\n"]
    return train_bpe(text * 20, vocab_size=300)


@FAST
@given(st.text(max_size=200))
def test_byte_level_tokenizer_round_trips_any_text(s):
    tok = byte_level_tokenizer()
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


@FAST
@given(st.text(max_size=200))
def test_trained_bpe_round_trips_any_text(bpe, s):
    # a special token's literal text is read as that token (as transformers does), and
    # special tokens are dropped when decoding: text holding one does not round-trip
    assume(EOT not in s)
    assert bpe.decode(bpe.encode(s, add_special_tokens=False)) == s


def test_a_special_tokens_literal_text_is_that_token(bpe):
    ids = bpe.encode(f"a{EOT}b", add_special_tokens=False)
    assert bpe.token_to_id(EOT) in ids and bpe.decode(ids) == "ab"


PLANS = [build_plan(6), build_plan(6, "cycle", 3), build_plan(8, "middle_cycle", 3)]


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["static", "continuous", "depthwise"]),
    plan_i=st.integers(0, len(PLANS) - 1),
    exits=st.booleans(),
    max_batch=st.integers(1, 6),
    n_requests=st.integers(1, 25),
    abort_rate=st.sampled_from([0.0, 0.1, 0.4]),
    seed=st.integers(0, 10_000),
)
def test_scheduler_invariants_under_random_traffic(
    policy, plan_i, exits, max_batch, n_requests, abort_rate, seed
):
    """No idle slot while work waits, no starvation (checked inside ``simulate``), every
    token runs exactly its depth's block passes, and everything drains to an empty state."""
    plan = PLANS[plan_i]
    tokens, s = simulate(
        policy,
        plan,
        2 if exits else None,
        max_batch=max_batch,
        n_requests=n_requests,
        seed=seed,
        abort_rate=abort_rate,
    )
    assert all(p == d for p, d in tokens)
    assert s.num_running == 0 and s.num_waiting == 0
    assert sorted(s.free_rows) == list(range(max_batch))


@pytest.fixture(scope="module")
def exit_model():
    return make_model(n_layers=6, exits={"steps": [2, 4], "trained": True})


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pattern=st.lists(st.lists(st.booleans(), min_size=1, max_size=12), min_size=1, max_size=3),
    new_tokens=st.integers(1, 12),
    prompt_lens=st.lists(st.integers(1, 9), min_size=3, max_size=3),
)
def test_free_cache_lengths_under_any_exit_pattern(exit_model, pattern, new_tokens, prompt_lens):
    """Shallow slots always hold every fed token; deep slots lag by exactly the stack of
    exited tokens awaiting their catch-up pass; depths are the exit or the full depth."""
    model = exit_model
    prompts = [
        [(7 * b + 3 * i) % 500 + 1 for i in range(prompt_lens[b])] for b in range(len(pattern))
    ]
    s = FREE(exit_step=2, threshold=0.5)
    seen = {}
    orig = s.decode

    def spy(model_, cache, tokens, n_new=None):
        seen["cache"] = cache
        return orig(model_, cache, tokens, n_new)

    s.decode = spy
    mp = pytest.MonkeyPatch()
    mp.setattr(free_mod, "confidence", _Scripted(pattern))
    try:
        res = generate(
            model, prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), strategy=s
        )
    finally:
        mp.undo()
    for r in res:
        assert len(r.token_ids) == new_tokens
        assert set(r.depths) <= {2, model.n_steps}
    cache = seen.get("cache")
    if cache is None:  # one token: decided by the prefill alone
        assert new_tokens == 1
        return
    for b, (p, r) in enumerate(zip(prompts, res)):
        fed = len(p) + len(r.token_ids) - 1
        assert cache.lengths[model.plan[0].kv_slot, b] == fed
        assert cache.lengths[model.plan[1].kv_slot, b] == fed
        deep = cache.lengths[model.plan[2].kv_slot, b]
        assert deep == fed - s.n_stack[b]
        assert 0 <= s.n_stack[b] <= fed
        for st_ in model.plan[2:]:
            assert cache.lengths[st_.kv_slot, b] == deep
