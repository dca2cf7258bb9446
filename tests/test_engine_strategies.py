"""The engine serves every strategy ``generate`` offers (issue 29), per request, in mixed
batches: each request equals its own single-request run, and speculation equals greedy
full-depth decoding whatever the batch, policy and rollbacks.

The references: greedy full depth (speculation is lossless by definition), and
single-request ``generate`` with the same strategy (its lock-step code is the paper's rule
for one sequence)."""

import random
import warnings

import numpy as np
import pytest
import torch

from earlyexit.decoding.calm import CALM
from earlyexit.decoding.free import FREE
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.speculative import DraftGate
from earlyexit.decoding.strategies import ExitWarning, OptionError, make_strategy
from earlyexit.decoding.threshold import BetaMixtureThreshold
from earlyexit.drafts import DraftSpec
from earlyexit.engine import ExitMode
from earlyexit.engine import LLMEngine as _LLMEngine
from earlyexit.errors import InputError
from tests.conftest import make_model

POLICIES = ["static", "continuous", "depthwise"]


def LLMEngine(*args, **kwargs):
    """The engine with every adaptive speculative round drafting: the default gate decides
    by measured time, and no test may depend on timing (the gate's rule and plain rounds
    have their own tests at the end)."""
    kwargs.setdefault("draft_gate", DraftGate(fixed=True))
    return _LLMEngine(*args, **kwargs)


def greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.0)


def prompts(n=6, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randint(1, 9))] for _ in range(n)]


LENGTHS = [9, 3, 14, 6, 11, 1]


def shallow_friendly(seed=0, n_layers=6, **exits):
    """Random weights whose deep layers change the residual little (small init): the exit
    after 2 steps agrees with the full model on many tokens but not all, so speculation
    both accepts and rolls back."""
    return make_model(
        n_layers=n_layers, exits={"steps": [2], "trained": True, **exits}, init_std=0.2, seed=seed
    )


def attention_draft_model():
    m = make_model(
        n_layers=6,
        exits={"steps": [2], "trained": True, "attention": True, "norms": True},
        init_std=0.05,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial adapter (its init zeroes the output projection)
        m.exit_attention[0].attn.wo.weight.normal_(0, 0.05, generator=g)
    m.draft = DraftSpec(exit_step=2, vocab=torch.arange(0, 512, 2), k=3, stop="adaptive")
    return m


def serve(engine, modes, params=None):
    """Serve prompts() with one mode per request; the finished requests, in order."""
    reqs = []
    for p, n, mode in zip(prompts(), LENGTHS, modes):
        rid = engine.add_request(p, params or greedy(n), mode)
        reqs.append(engine.requests[rid])
    while engine.has_unfinished():
        engine.step()
    return reqs


def full_greedy(model, i):
    return generate(model, [prompts()[i]], greedy(LENGTHS[i]))[0].token_ids


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("max_batch", [1, 3, 6])
def test_batched_speculation_equals_full_depth_greedy(policy, max_batch):
    m = shallow_friendly()
    engine = LLMEngine(m, policy=policy, max_batch=max_batch, max_len=64)
    modes = [ExitMode(2, strategy="speculative", draft_k=k) for k in (1, 4, 3, 2, 4, 5)]
    reqs = serve(engine, modes)
    for i, req in enumerate(reqs):
        assert req.output_ids == full_greedy(m, i), i
        assert req.depths == [m.n_steps] * len(req.output_ids)
    drafted = sum(r.drafted for r in reqs)
    accepted = sum(r.accepted for r in reqs)
    assert 0 < accepted < drafted  # both accepts and rollbacks happened
    assert engine.occupancy()["running"] == 0 and not engine._spec


@pytest.mark.parametrize("policy", ["continuous", "depthwise"])
def test_rows_of_every_strategy_share_steps_and_each_equals_its_own_run(policy):
    """A mixed batch: full, FREE (fixed and adaptive), CALM and speculative requests run
    in the same steps; each equals its own single-request run."""
    m = shallow_friendly(n_layers=8, steps=[2, 4])
    engine = LLMEngine(m, policy=policy, max_batch=4, max_len=64, measure_draft_cost=False)
    modes = [
        None,
        ExitMode(2, 0.02),
        ExitMode(2, strategy="speculative", draft_k=3),
        ExitMode(2, 0.02, strategy="calm"),
        ExitMode(2, strategy="speculative", draft_k=2, draft_stop=0.3),
        ExitMode(4, 0.05, strategy="calm", deep_kv="skip"),
    ]
    reqs = serve(engine, modes)
    refs = [
        None,
        lambda: FREE(2, 0.02),
        None,
        lambda: CALM(0.02, 2),
        None,
        lambda: CALM(0.05, 4, deep_kv="skip"),
    ]
    for i, (req, ref) in enumerate(zip(reqs, refs)):
        if ref is None:  # full depth and speculation: exactly greedy full depth
            assert req.output_ids == full_greedy(m, i), i
            continue
        out = generate(m, [prompts()[i]], greedy(LENGTHS[i]), strategy=ref())[0]
        assert (req.output_ids, req.depths) == (out.token_ids, out.depths), i
    assert {d for r in reqs for d in r.depths} >= {2, 4, 8}  # exits at both points happened


def test_speculation_with_an_attention_draft_in_the_engine_equals_full_greedy():
    """The draft's own KV slot is filled at admission and rolled back with the others; its
    pruned vocabulary and adaptive stop come from the attached draft."""
    m = attention_draft_model()
    engine = LLMEngine(m, policy="depthwise", max_batch=3, max_len=64, measure_draft_cost=False)
    reqs = serve(engine, [ExitMode(strategy="speculative")] * 6)
    for i, req in enumerate(reqs):
        assert req.output_ids == full_greedy(m, i), i
    assert reqs[0].exit.draft_k == 3 and reqs[0].exit.draft_stop == "adaptive"
    rule = engine._stop_rules[2]
    assert rule.total.sum() > 0  # the shared stop rule learned from verifications
    assert sum(r.drafted for r in reqs) > 0


def test_adaptive_free_in_the_engine_equals_sequential_generate_with_one_calibrator():
    """FREE's threshold is fitted per served model: serving requests one after another
    equals generating them one after another with one shared calibrator (same samples,
    same refits, same thresholds)."""
    m = shallow_friendly()
    with torch.no_grad():  # sharper logits: some margins pass the initial 0.9
        m.norm.weight.mul_(5)
    engine = LLMEngine(m, policy="continuous", max_batch=1, max_len=64)
    shared = BetaMixtureThreshold(initial=0.9)
    for i, p in enumerate(prompts()):
        rid = engine.add_request(p, greedy(LENGTHS[i]), ExitMode(2, "adaptive"))
        req = engine.requests[rid]
        while engine.has_unfinished():
            engine.step()
        s = FREE(2, 0.9, adaptive=True, calibrator=shared)
        ref = generate(m, [p], greedy(LENGTHS[i]), strategy=s)[0]
        assert (req.output_ids, req.depths) == (ref.token_ids, ref.depths), i
    cal = engine._calibrators[(2, "margin")]
    assert cal.conf == shared.conf and cal.agree == shared.agree and len(cal.conf) > 0
    assert cal.value == shared.value and cal.fits > 0


def test_the_classifier_confidence_is_served():
    m = shallow_friendly(classifier=True)
    with torch.no_grad():  # a classifier that is confident for some tokens and not others
        m.exit_classifiers[0].fc2.bias.copy_(torch.tensor([0.0, 0.3]))
    engine = LLMEngine(m, policy="depthwise", max_batch=3, max_len=64)
    reqs = serve(engine, [ExitMode(2, 0.55, measure="classifier")] * 6)
    for i, req in enumerate(reqs):
        ref = generate(
            m, [prompts()[i]], greedy(LENGTHS[i]), strategy=FREE(2, 0.55, measure="classifier")
        )[0]
        assert (req.output_ids, req.depths) == (ref.token_ids, ref.depths), i
    assert len({d for r in reqs for d in r.depths[1:]}) > 1


def test_abort_mid_draft_frees_the_row_and_the_rest_stay_exact():
    m = shallow_friendly()
    engine = LLMEngine(m, policy="depthwise", max_batch=2, max_len=64)
    mode = ExitMode(2, strategy="speculative", draft_k=4)
    a = engine.add_request(prompts()[0], greedy(30), mode)
    for _ in range(200):
        engine.step()
        if engine._spec.get(a) and engine._spec[a].drafts:
            break
    assert engine._spec[a].drafts, "never caught a draft in progress"
    row = engine.scheduler.rows[a]
    assert engine.abort(a)
    assert a not in engine._spec and a not in engine.scheduler.rows
    assert engine.runner.hlen[row] == 0 and engine.runner.slen[row] == 0
    reqs = serve(engine, [mode] * 6)  # the freed row serves the next requests exactly
    for i, req in enumerate(reqs):
        assert req.output_ids == full_greedy(m, i), i
    assert engine.occupancy()["running"] == 0
    assert sorted(engine.scheduler.free_rows) == [0, 1]


def test_draft_prices_follow_the_measured_verification_cost_of_the_batch():
    """The adaptive stop's price of draft i at batch n: the base (shallow pass and head) plus
    (L - l)/L (t((i+2)n) - t((i+1)n)) / t(n), t the measured forward time (given here, as a
    measurement would give it; interpolated between the measured points)."""
    m = attention_draft_model()
    engine = LLMEngine(m, max_batch=8, max_len=64)
    engine._forward_times = {1: 1.0, 2: 1.05, 4: 1.2, 8: 2.0, 16: 4.0, 32: 8.0}
    prices = {}
    for running in (1, 4, 8):
        engine.scheduler.cursors = {f"r{i}": None for i in range(running)}
        prices[running] = engine._draft_prices(2, 2)
    base = prices[1][0] - 4 / 6 * 0.05
    assert 0 < base < 0.5
    assert prices[1][1] == pytest.approx(base + 4 / 6 * (1.125 - 1.05))  # t(3) interpolated
    assert prices[4][0] == pytest.approx(base + 4 / 6 * 0.8 / 1.2)
    assert prices[8][0] == pytest.approx(min(0.95, base + 4 / 6 * 2.0 / 2.0))
    assert prices[1][0] < prices[4][0] < prices[8][0]


def test_no_draft_head_runs_where_no_draft_could_pay():
    """The floor: with a stop rule whose every bin accepts too rarely for the price, a
    request runs full-depth steps (no draft head, no drafts), exactly greedy: every round
    runs plain (one segment), not split into shallow and deep segments with no drafts."""
    m = attention_draft_model()
    m.draft.stop_prior = {"accepted": [1.0] * 10, "total": [10.0] * 10}  # a = 1/6 everywhere
    engine = LLMEngine(m, policy="depthwise", max_batch=3, max_len=64, measure_draft_cost=False)
    calls = []
    draft = engine.runner.draft
    engine.runner.draft = lambda *a: calls.append(a) or draft(*a)
    reqs = serve(engine, [ExitMode(strategy="speculative")] * 6)
    for i, req in enumerate(reqs):
        assert req.output_ids == full_greedy(m, i), i
    assert not calls and sum(r.drafted for r in reqs) == 0
    assert engine.stats["plain_rounds"] == sum(len(r.output_ids) - 1 for r in reqs)


def test_modes_are_validated_with_the_field_named():
    m = shallow_friendly(classifier=False)
    engine = LLMEngine(m, max_batch=2, max_len=64)
    cases = [
        (ExitMode(9), "exit_step"),
        (ExitMode(2, 1.5), "threshold"),
        (ExitMode(2, "adaptive", deep_kv="skip"), "threshold"),
        (ExitMode(2, "adaptive", strategy="calm"), "threshold"),
        (ExitMode(2, measure="classifier"), "confidence"),
        (ExitMode(2, measure="saturation"), "confidence"),
        (ExitMode(2, strategy="calm", deep_kv="catch-up"), "deep_kv"),
        (ExitMode(2, strategy="speculative", draft_k=0), "draft_tokens"),
        (ExitMode(2, strategy="fast"), "strategy"),
    ]
    for mode, field in cases:
        with pytest.raises(OptionError) as e:
            engine.add_request([1, 2], greedy(2), mode)
        assert e.value.param == field, (mode, e.value)
    with pytest.raises(OptionError) as e:  # speculation is greedy-only
        engine.add_request(
            [1, 2],
            SamplingParams(max_new_tokens=2, temperature=0.7),
            ExitMode(2, strategy="speculative"),
        )
    assert e.value.param == "temperature"
    assert not engine.requests  # nothing was queued


def test_untrained_exits_are_refused_for_lossy_strategies_unless_allowed():
    """Issue 33: exits that were never trained lead into garbage; refuse them for the
    lossy strategies (with the way forward), allow them explicitly with a warning, and let
    speculation run (exact) with a warning that it will be slower."""
    m = make_model(n_layers=6, exits={"steps": [2]})  # trained: False
    for name in ("free", "calm", "static"):
        with pytest.raises(InputError, match=r"never trained.*train"):
            make_strategy(m, name)
    with pytest.raises(InputError, match="not an exit point"):
        make_strategy(make_model(n_layers=6), "free", exit_step=3)
    with pytest.warns(ExitWarning, match="poor"):
        make_strategy(m, "free", allow_untrained=True)
    with pytest.warns(ExitWarning, match="slower"):
        make_strategy(m, "speculative")
    engine = LLMEngine(m, max_batch=2, max_len=64)
    with pytest.raises(OptionError, match="allow-untrained-exits") as e:
        engine.add_request([1, 2], greedy(2), ExitMode(2, 0.5))
    assert e.value.param == "exit_step"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExitWarning)
        with pytest.raises(ExitWarning, match="slower"):
            engine.add_request([1, 2], greedy(2), ExitMode(2, strategy="speculative"))
    allowed = LLMEngine(m, max_batch=2, max_len=64, allow_untrained_exits=True)
    with pytest.warns(ExitWarning, match="poor"):
        allowed.add_request([1, 2], greedy(2), ExitMode(2, 0.5))


def test_usage_counts_exits_drafts_and_acceptances():
    m = shallow_friendly()
    engine = LLMEngine(m, policy="continuous", max_batch=3, max_len=64)
    reqs = serve(engine, [ExitMode(2, 0.01), ExitMode(2, strategy="speculative", draft_k=3)] * 3)
    free, spec = reqs[0::2], reqs[1::2]
    for r in free:  # exits: tokens decided at the exit, counted from the depths
        assert r.exited == sum(d < m.n_steps for d in r.depths) and r.drafted == 0
    assert sum(r.exited for r in free) > 0
    for r in spec:  # every round emits its accepted drafts plus one token
        assert r.exited == 0 and r.accepted <= r.drafted
    assert sum(r.accepted for r in spec) == engine.stats["accepted"] > 0
    np.testing.assert_equal(engine.stats["drafted"], sum(r.drafted for r in spec))


@pytest.mark.parametrize("policy", ["continuous", "depthwise"])
def test_speculative_rows_verify_together(policy):
    """A deep pass costs all of the deep weights whatever it verifies, so rows verify in the
    same iterations: whenever a verification runs, no other speculative row is drafting
    (measured without this: 0.71-0.76x full depth at max batch 4-16 on SmolLM2)."""
    m = shallow_friendly()
    engine = LLMEngine(m, policy=policy, max_batch=4, max_len=64, measure_draft_cost=False)
    seen = []
    run = engine.runner.run

    def spy(items, one_block):
        cursors = engine.scheduler.cursors
        rows = {row: rid for rid, row in engine.scheduler.rows.items()}
        spec = {rid for rid in engine._spec if rid in cursors}
        verifying = {rows[r] for r, start, _ in items if start >= 2 and rows[r] in spec}
        if verifying:
            drafting = {rid for rid in spec if cursors[rid].end == 2}
            seen.append((len(verifying), drafting))
        return run(items, one_block)

    engine.runner.run = spy
    mode = [ExitMode(2, strategy="speculative", draft_k=k) for k in (4, 1, 3, 2, 4, 2)]
    reqs = serve(engine, mode)
    for i, req in enumerate(reqs):
        assert req.output_ids == full_greedy(m, i), i
    assert seen and all(not drafting for _, drafting in seen)
    assert max(n for n, _ in seen) > 1  # several rows' verifications in one call


def test_rows_verified_together_draft_together():
    """``batch_keeps``: one more position costs every row of a padded verification, so the
    rows draft it iff the mean chance that their drafts pass reaches the price (hand
    computed: Beta(1, 1) posteriors 1/12 and 10/11 per bin)."""
    from earlyexit.decoding.speculative import AdaptiveStop, batch_keeps

    rule = AdaptiveStop(0.5, bins=2, warmup=1, prior={"accepted": [0, 9], "total": [10, 9]})
    go, reach = batch_keeps(rule, False, np.array([0.9, 0.1]), np.array([1.0, 1.0]), 0.5)
    np.testing.assert_allclose(reach, [10 / 11, 1 / 12])
    assert not go  # mean 0.496 < 0.5: neither drafts, though one row alone would
    go, _ = batch_keeps(rule, False, np.array([0.9, 0.1]), np.array([1.0, 1.0]), 0.49)
    assert go  # both draft, the unlikely one too (its position is paid for anyway)
    cold = AdaptiveStop(0.5, bins=2, warmup=100)
    assert batch_keeps(cold, True, np.array([0.1]), np.array([1.0]), 0.9)[0]  # warm-up
    assert not batch_keeps(cold, False, np.array([0.1]), np.array([1.0]), 0.9)[0]


# ---------------------------------------------------------------------- the draft gate


def _adapter_kv_reference(m, tokens):
    """The attention adapter's K/V over ``tokens``, written by an uncached-style prefill
    through ``run_filling_exits`` into a fresh cache (the prompt path, independent of the
    engine's rounds): (k, v), each (n_kv_heads, len(tokens), head_dim)."""
    from earlyexit.models.kv_cache import KVCache

    cache = KVCache.for_model(m, 1, 64)
    t = torch.tensor([tokens])
    with torch.inference_mode():
        ctx = m.context(torch.arange(len(tokens))[None], cache, n_new=np.array([len(tokens)]))
        m.run_filling_exits(m.embed(t), ctx)
    slot = m.config.exit_kv_slot(0)
    assert cache.lengths[slot, 0] == len(tokens)
    return cache.k[slot][0, :, : len(tokens)], cache.v[slot][0, :, : len(tokens)]


@pytest.mark.parametrize("policy", ["continuous", "depthwise"])
def test_plain_rounds_run_the_whole_depth_at_once_and_fill_the_draft_adapter(policy):
    """When the gate says no drafting, a speculative request runs as full depth does: one
    segment per token (the same iterations), exactly greedy, and the draft adapter's K/V
    gains every position on the way, equal to what a prefill over the same tokens writes
    (so the next drafting round attends over the whole context)."""
    m = attention_draft_model()
    plain = LLMEngine(m, policy=policy, max_batch=1, max_len=64, draft_gate=DraftGate(fixed=False))
    full = LLMEngine(m, policy=policy, max_batch=1, max_len=64)
    slot = m.config.exit_kv_slot(0)
    for i, p in enumerate(prompts()[:3]):
        rid = plain.add_request(p, greedy(LENGTHS[i]), ExitMode(strategy="speculative"))
        req = plain.requests[rid]
        while plain.has_unfinished():
            plain.step()
        ref = full.generate([p], greedy(LENGTHS[i]))[0]
        assert req.output_ids == ref.output_ids == full_greedy(m, i), i
        assert req.drafted == 0
        # the last token was never fed back: the adapter holds prompt + outputs[:-1]
        tokens = p + req.output_ids[:-1]
        k_ref, v_ref = _adapter_kv_reference(m, tokens)
        n = plain.runner.cache.lengths[slot, 0]
        assert n == len(tokens), i
        torch.testing.assert_close(plain.runner.cache.k[slot][0, :, :n], k_ref)
        torch.testing.assert_close(plain.runner.cache.v[slot][0, :, :n], v_ref)
    assert plain.stats["iterations"] == full.stats["iterations"]  # no shallow/deep split
    assert plain.stats["plain_rounds"] > 0 and plain.stats["drafted"] == 0


class _Alternate(DraftGate):
    """A gate that flips between drafting and plain rounds every ``every`` decisions."""

    def __init__(self, every):
        super().__init__()
        self.every, self.calls = every, 0

    def drafting(self, n):
        self.calls += 1
        return (self.calls // self.every) % 2 == 0


@pytest.mark.parametrize("every", [1, 3])
def test_plain_and_drafting_rounds_mix_exactly(every):
    """Rows switching between plain and drafting rounds, in one batch with full-depth rows:
    speculation stays exactly greedy and drafts are still accepted after plain rounds."""
    m = attention_draft_model()
    engine = LLMEngine(m, policy="depthwise", max_batch=3, max_len=64, draft_gate=_Alternate(every))
    modes = [ExitMode(strategy="speculative"), None] * 3
    reqs = serve(engine, modes)
    for i, req in enumerate(reqs):
        assert req.output_ids == full_greedy(m, i), i
    assert engine.stats["plain_rounds"] > 0 and engine.stats["drafted"] > 0
    assert engine.occupancy()["running"] == 0 and not engine._spec
    assert (engine.runner.adapter_at == -1).all()


def test_the_gate_runs_the_mode_measured_faster_per_batch_size():
    """Both modes measured once per batch bucket (drafting first), then the faster one; the
    slower is re-measured after ``explore`` epochs, then after twice as many each time it
    confirms the order; when the order changes the gate switches and the interval starts
    again; settling iterations, and epochs cut by a change of bucket, are not counted."""
    g = DraftGate(epoch=4, settle=1, explore=4, decay=1.0, min_pairs=1)
    cost = {True: 0.5, False: 1.0}  # seconds per token of each mode, changed below

    def epoch(n):
        modes = []
        for _ in range(4):
            modes.append(g.drafting(n))
            g.record(n, 2, 2 * cost[modes[-1]])
        (mode,) = set(modes)  # one mode per epoch
        return mode

    T, F = True, False
    assert [epoch(8) for _ in range(16)] == [T, F, T, T, T, T, F] + [T] * 8 + [F]
    assert g.seconds_per_token[8] == {True: 0.5, False: 1.0}
    cost[True] = 2.0  # drafting got slower: its next epoch says so, and the gate switches
    assert [epoch(8) for _ in range(6)] == [T, F, F, F, F, T]  # drafting re-measured after 4
    assert g.seconds_per_token[8] == {True: 2.0, False: 1.0}
    assert [epoch(8) for _ in range(9)] == [F] * 8 + [T]  # confirmed: after 8
    # another bucket learns on its own, starting plain (bucket 8 now finds drafting
    # slower, and a larger batch only makes verification dearer), then pairing
    assert [epoch(16) for _ in range(3)] == [F, T, F]
    g2 = DraftGate(epoch=4, settle=0, explore=4, decay=1.0)  # a fresh gate drafts first
    assert [g2.drafting(n) for n in (1, 4, 64)] == [T, T, T]
    assert g.state()[16] == {
        "draft": 2.0,
        "plain": 1.0,
        "draft_over_plain": pytest.approx(2.0),
        "pairs": 2,
        "epochs": 3,
    }
    # a bucket change mid-epoch drops the unfinished epoch
    before = dict(g.seconds_per_token[8])
    g.record(8, 2, 100.0)
    g.record(4, 2, 100.0)
    assert g.seconds_per_token[8] == before and 4 not in g.seconds_per_token
    # settling iterations do not count: a slow first iteration changes nothing
    h = DraftGate(epoch=3, settle=1, decay=1.0)
    for sec in (50.0, 1.0, 1.0):
        h.record(1, 1, sec)
    assert h.seconds_per_token[1] == {True: 1.0}
    assert DraftGate.bucket(1) == 1 and DraftGate.bucket(5) == 8 and DraftGate.bucket(16) == 16
    # drafting must win by the margin (5%): 3% faster is not enough
    m = DraftGate(epoch=2, settle=0, decay=1.0)
    for mode_cost in (0.97, 1.0):
        for _ in range(2):
            m.record(8, 1, mode_cost)
    assert m.state()[8]["draft_over_plain"] == pytest.approx(0.97)
    assert not m.drafting(8)
    with pytest.raises(ValueError):
        DraftGate(epoch=2, settle=2)


def test_drafting_is_believed_only_after_min_pairs_pairs_plain_after_one():
    """Asymmetric evidence: a first pair that favours drafting is checked by more pairs
    gathered back to back (alternating modes) before the gate drafts for good; a first pair
    that favours plain rounds is believed at once."""
    T, F = True, False

    def run(gate, draft_cost, epochs, n=8):
        modes = []
        for _ in range(epochs):
            mode = gate.drafting(n)
            for _ in range(4):
                gate.record(n, 1, draft_cost if mode else 1.0)
            modes.append(mode)
        return modes

    fast = DraftGate(epoch=4, settle=0, explore=8, decay=1.0, min_pairs=3)
    assert run(fast, 0.5, 8) == [T, F, T, F, T, T, T, T]  # pairs 1-3 alternate, then drafts
    assert fast.pairs[8] == 4 and fast.drafting(8)  # the switch to drafting pairs once more
    slow = DraftGate(epoch=4, settle=0, explore=8, decay=1.0, min_pairs=3)
    assert run(slow, 2.0, 8) == [T, F, F, F, F, F, F, F]  # plain after one pair
    # noise that once favours drafting is caught by the next pairs: the true ratio is 1.2,
    # one lucky drafting epoch at 0.5 makes the first pair say 0.5
    noisy = DraftGate(epoch=4, settle=0, explore=8, decay=0.5, min_pairs=3)
    costs = iter([0.5] + [1.2] * 20)
    modes = []
    for _ in range(8):
        mode = noisy.drafting(8)
        c = next(costs) if mode else 1.0
        for _ in range(4):
            noisy.record(8, 1, c)
        modes.append(mode)
    assert modes[:4] == [T, F, T, F] and modes[4:] == [F] * 4  # back to plain, for good
    assert not noisy._proven(8)


def test_the_gate_compares_adjacent_epochs_so_a_changing_machine_does_not_fool_it():
    """Drafting costs 0.8x plain throughout, while the machine slows by 1.2x per epoch (a
    neighbour starting up): per-mode averages would compare a plain epoch measured early
    with drafting measured late and switch to plain; paired epochs keep drafting (every
    pair says 0.67x or 0.96x)."""
    g = DraftGate(epoch=4, settle=0, explore=4, decay=0.5, min_pairs=1)
    load = [1.0]
    modes = []
    for _ in range(24):
        mode = g.drafting(8)
        for _ in range(4):
            g.record(8, 1, (0.8 if mode else 1.0) * load[0])
        modes.append(mode)
        load[0] *= 1.2
    assert modes[:2] == [True, False]
    assert modes.count(False) <= 4  # the first pair and the re-measurements only
    assert all(modes[i] for i in range(len(modes)) if i not in (1, 6, 15))
    assert g.state()[8]["draft_over_plain"] < 1.0
    # per-mode averages alone would have said the opposite by now
    assert g.seconds_per_token[8][True] > g.seconds_per_token[8][False]


def test_the_engine_times_its_iterations_for_the_gate(monkeypatch):
    """The engine passes each iteration's running count, decode tokens and wall time to the
    gate while adaptive speculation is in flight: iterations that admit too (the decode work
    beside a prefill is what the modes differ in), but never the prefill's own seconds or the
    prompts' first tokens (they cost the same in either mode); nothing when no request is
    gated. The engine's clock is a fake one: each reading adds 1, each prefill 1000."""
    import types

    import earlyexit.engine.engine as engine_module

    class Recorder(DraftGate):
        def __init__(self):
            super().__init__(fixed=True)
            self.records = []

        def record(self, n, tokens, seconds):
            self.records.append((n, tokens, seconds))

    clock = [0.0]

    def tick():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(
        engine_module, "time", types.SimpleNamespace(perf_counter=tick, monotonic=tick)
    )
    m = attention_draft_model()
    gate = Recorder()
    engine = LLMEngine(m, policy="depthwise", max_batch=3, max_len=64, draft_gate=gate)
    prefill = engine.runner.prefill

    def slow_prefill(*a, **k):
        clock[0] += 1000.0
        return prefill(*a, **k)

    engine.runner.prefill = slow_prefill
    admitted, grew = [], []  # per iteration: did it admit; records made during it
    schedule = engine.scheduler.schedule

    def spy():
        out = schedule()
        admitted.append(bool(out.admit))
        return out

    engine.scheduler.schedule = spy
    mode = ExitMode(strategy="speculative")
    reqs = [engine.requests[engine.add_request(p, greedy(6), mode)] for p in prompts()[:6]]
    while engine.has_unfinished():
        before = len(gate.records)
        engine.step()
        grew.append(len(gate.records) - before)
    assert gate.records and all(0 < s < 1000 and 1 <= n <= 3 for n, _, s in gate.records)
    timed = [*grew[1:], 0]  # iteration i is recorded when iteration i + 1 starts
    assert sum(a and t for a, t in zip(admitted, timed)) >= 2  # admitting ones too
    # every iteration but the last ones (nothing after them, or nothing left to gate)
    assert len(admitted) - 3 <= len(gate.records) <= len(admitted) - 1
    emitted = sum(len(r.output_ids) for r in reqs)
    # the prompts' first tokens never count; the last iterations' tokens may not
    assert emitted - 6 - 3 * 6 <= sum(t for _, t, _ in gate.records) <= emitted - 6
    gate.records.clear()
    serve(engine, [None] * 6)  # full-depth requests only: nothing to decide
    assert not gate.records


@pytest.mark.parametrize("policy", ["continuous", "depthwise"])
def test_a_speculative_round_takes_two_engine_iterations(policy):
    """A draft chain runs inside the iteration that starts it (each link's shallow pass
    right after the decision before it), so a round is one iteration of shallow passes and
    drafts and one of verification, however many drafts it has, and stays exact."""
    m = shallow_friendly()
    engine = LLMEngine(m, policy=policy, max_batch=1, max_len=64)
    mode = ExitMode(2, strategy="speculative", draft_k=3, draft_stop=0.0)  # always 3 drafts
    rid = engine.add_request(prompts()[2], greedy(14), mode)
    req = engine.requests[rid]
    while engine.has_unfinished():
        engine.step()
    assert req.output_ids == full_greedy(m, 2)
    rounds = req.drafted // 3
    assert req.drafted == 3 * rounds and rounds >= 2
    assert engine.stats["iterations"] == 1 + 2 * rounds  # the prefill, then 2 per round
    # layer steps: the prefill's last position (6), then per round 4 positions (the input
    # and 3 drafts) through 2 shallow steps each and 4 deep steps each
    assert req.steps_run == m.n_steps + rounds * 4 * (2 + 4)
