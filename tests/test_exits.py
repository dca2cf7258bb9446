"""Early exit: free.md §7 invariants, CALM, static exit, self-speculation, batching."""

import math
import warnings

import numpy as np
import pytest
import torch

from earlyexit.decoding import free as free_mod
from earlyexit.decoding.calm import CALM
from earlyexit.decoding.free import FREE
from earlyexit.decoding.full import StaticExit
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.speculative import SelfSpeculative
from earlyexit.decoding.strategies import ExitWarning, make_strategy
from earlyexit.decoding.threshold import GRID, BetaMixtureThreshold, beta_moments
from earlyexit.errors import InputError
from earlyexit.models.kv_cache import KVCache
from tests.conftest import make_model
from tests.reference import rms, rope

warnings.filterwarnings("ignore", category=ExitWarning)
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)


@pytest.fixture
def model():
    # init_std 0.3: peaked enough distributions that thresholds near 0.06 split the tokens
    return make_model(n_layers=6, exits={"steps": [2, 4], "trained": True}, init_std=0.3)


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 512, (int(k),), generator=g).tolist()
        for k in torch.randint(2, 9, (n,), generator=g)
    ]


def tokens_of(res):
    return [r.token_ids for r in res]


def test_last_exit_equals_the_full_model(model):
    x = torch.randint(0, 512, (2, 10))
    with torch.inference_mode():
        out = model(x, exits=True)
        torch.testing.assert_close(out.exit_logits[-1], model(x), atol=0, rtol=0)
        h = model.hidden_states(x)
        torch.testing.assert_close(model.exit_logits(h[1], 2), out.exit_logits[0], atol=0, rtol=0)
    plain = make_model(n_layers=6, init_std=0.3)  # same weights, no exits configured
    with torch.inference_mode():
        assert torch.equal(plain(x), model(x))


def test_free_never_exiting_equals_full(model):
    ps = prompts()
    full = tokens_of(generate(model, ps, GREEDY))
    s = FREE(exit_step=2, threshold=1.0)
    assert tokens_of(generate(model, ps, GREEDY, strategy=s)) == full
    st = s.stats()
    assert st["shallow"] == 0 and st["deep_passes"] == st["tokens"] and st["caught_up"] == 0


def test_free_always_exiting_equals_static_exit_and_deep_kv_stays(model):
    ps = prompts()
    static = generate(model, ps, GREEDY, strategy=StaticExit(2))
    s = FREE(exit_step=2, threshold=-1.0)
    res = generate(model, ps, GREEDY, strategy=s)
    assert tokens_of(res) == tokens_of(static)
    assert all(r.depths[0] == 6 and set(r.depths[1:]) == {2} for r in res)  # first from prefill
    assert s.stats()["deep_passes"] == 0


class _Scripted:
    """Confidence stand-in: row b exits at decode step t iff pattern[b][t] (mocks §7.3)."""

    def __init__(self, pattern):
        self.pattern, self.t = pattern, 0

    def __call__(self, kind, logits, *a, **k):
        col = [p[self.t % len(p)] for p in self.pattern]
        self.t += 1
        return torch.tensor([1.0 if c else 0.0 for c in col])


def _teacher_forced_cache(model, seqs):
    """Caches of a full-depth forward over each row's emitted prefix."""
    caches = []
    for s in seqs:
        c = KVCache.for_model(model, 1, len(s) + 1)
        with torch.inference_mode():
            model(torch.tensor([s]), cache=c)
        caches.append(c)
    return caches


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize(
    "pattern",
    [
        [[1, 1, 0, 1, 0, 0, 1, 1, 1, 0]],
        [[1, 0], [0, 1], [1, 1, 1, 0]],
        [[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 1]],  # all three rows exit at steps 0 and 3
    ],
)
def test_free_deep_kv_is_exact_and_deep_tokens_are_the_full_models(pattern, sync, monkeypatch):
    """§7.3 KV exactness, §7.5 deep decision, §7.6 lengths, §7.7 chunk == token by token;
    with ``sync_batch`` a step exits iff every row's script says so (all rows together)."""
    # exits are scripted, so the small default init (small activations, tight tolerance) fits
    model = make_model(n_layers=6, exits={"steps": [2, 4], "trained": True})
    monkeypatch.setattr(free_mod, "confidence", _Scripted(pattern))
    ps = prompts(len(pattern), seed=1)
    s = FREE(exit_step=2, threshold=0.5, sync_batch=sync)
    caches = {}
    orig_decode = s.decode

    def spy(model_, cache, tokens, n_new=None):
        caches["c"] = cache
        return orig_decode(model_, cache, tokens, n_new)

    s.decode = spy
    res = generate(model, ps, SamplingParams(max_new_tokens=10, ignore_eos=True), strategy=s)
    cache = caches["c"]
    for b, (p, r) in enumerate(zip(ps, res)):
        seq = p + r.token_ids[:-1]  # what has been fed through the model
        shallow_len = cache.lengths[model.plan[0].kv_slot, b]
        deep_len = cache.lengths[model.plan[2].kv_slot, b]
        assert shallow_len == len(seq)
        assert deep_len == len(seq) - s.n_stack[b]  # deep length + |S| = shallow length
        ref = _teacher_forced_cache(model, [seq])[0]
        for step in model.plan:
            n = cache.lengths[step.kv_slot, b]
            torch.testing.assert_close(
                cache.k[step.kv_slot][b, :, :n], ref.k[step.kv_slot][0, :, :n], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                cache.v[step.kv_slot][b, :, :n], ref.v[step.kv_slot][0, :, :n], atol=1e-5, rtol=1e-5
            )
        # every token decided at full depth is the full model's argmax given the emitted prefix
        with torch.inference_mode():
            full_logits = model(torch.tensor([p + r.token_ids]))[0]
        for t, (tok, depth) in enumerate(zip(r.token_ids, r.depths)):
            if depth == model.n_steps:
                assert tok == int(full_logits[len(p) - 1 + t].argmax())
        # token 0 comes from the prefill, token t from decode step t - 1 of the script
        script = [pattern[b][(t - 1) % len(pattern[b])] for t in range(1, len(r.depths))]
        together = [all(row[(t - 1) % len(row)] for row in pattern) for t in range(1, 10)]
        want = together if sync else script
        assert r.depths[1:] == [2 if e else model.n_steps for e in want]
    if sync:
        assert len(set(s.n_stack.tolist())) == 1  # stacks grow together: no padded chunk


def test_free_calibration_logs_n_plus_one_pairs(model, monkeypatch):
    # one row: exit, exit, deep (2 stacked + trigger = 3 pairs), deep (empty stack: none)
    monkeypatch.setattr(free_mod, "confidence", _Scripted([[1, 1, 0, 0]]))
    s = FREE(exit_step=2, threshold=0.5, adaptive=True)
    generate(model, prompts(1), SamplingParams(max_new_tokens=5, ignore_eos=True), strategy=s)
    assert len(s.calibrator.conf) == len(s.calibrator.agree) == 3
    assert s.calibrator.conf[:2] == [1.0, 1.0] and s.calibrator.conf[2] == 0.0


def test_free_sync_batch_calibrates_on_outvoted_rows(monkeypatch):
    """A confident row sent deep by a batch-mate is what an exit would have given: its
    (confidence, exit argmax == full argmax) pair is logged, the label checked against a
    teacher-forced forward; the unconfident batch-mate logs nothing (empty stack)."""
    model = make_model(n_layers=6, exits={"steps": [2, 4], "trained": True}, init_std=0.3)
    monkeypatch.setattr(free_mod, "confidence", _Scripted([[1], [0]]))
    s = FREE(exit_step=2, threshold=0.5, adaptive=True, sync_batch=True)
    ps = prompts(2, seed=5)
    res = generate(model, ps, SamplingParams(max_new_tokens=5, ignore_eos=True), strategy=s)
    assert all(d == model.n_steps for r in res for d in r.depths)
    assert s.calibrator.conf == [1.0] * 4 and s.stats()["outvoted"] == 4
    p, r = ps[0], res[0]
    with torch.inference_mode():
        out = model(torch.tensor([p + r.token_ids]), exits=True)
    shallow, full = out.exit_logits[0][0], out.exit_logits[-1][0]  # step 2, final
    want = [
        int(shallow[len(p) - 1 + t].argmax() == full[len(p) - 1 + t].argmax()) for t in (1, 2, 3, 4)
    ]
    assert s.calibrator.agree == want


def test_beta_mixture_threshold():
    rng = np.random.default_rng(0)
    x = rng.beta(2.0, 5.0, 200_000)
    a, b = beta_moments(x, np.ones_like(x))
    assert abs(a - 2.0) < 0.05 and abs(b - 5.0) < 0.1
    bmm = BetaMixtureThreshold(initial=0.77, max_fits=3)
    assert bmm.start_sequences() == 0.77  # no data: the user's value
    agree = rng.beta(8, 2, 500)
    disagree = rng.beta(2, 6, 500)
    bmm.observe(list(agree) + list(disagree), [1] * 500 + [0] * 500)
    assert bmm.value == 0.77  # changes only when a sequence starts
    lam = bmm.start_sequences()
    assert lam in GRID and 0.3 <= lam <= 0.9 and bmm.fits == 1
    bmm.observe([0.99] * 50, [0] * 50)  # would move it, but only 3 sequences get fits
    bmm.start_sequences(5)
    frozen = bmm.value
    bmm.observe([0.5] * 500, [1] * 500)
    assert bmm.start_sequences() == frozen and bmm.state()["frozen"]


def test_free_adaptive_threshold_stays_on_the_grid_and_is_visible(model):
    s = make_strategy(model, "free", threshold=0.3, adaptive=True)
    for seed in range(3):
        generate(model, prompts(2, seed=seed), GREEDY, strategy=s)
    st = s.stats()["calibrator"]
    assert st["sequences"] == 6 and (st["threshold"] in GRID or st["threshold"] == 0.3)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_equals_full_token_for_token(model, k):
    ps = prompts(4, seed=2)
    full = generate(model, ps, GREEDY)
    s = SelfSpeculative(exit_step=2, k=k)
    spec = generate(model, ps, GREEDY, strategy=s)
    assert tokens_of(spec) == tokens_of(full)
    st = s.stats()
    assert 0 <= st["acceptance_rate"] <= 1 and st["emitted"] >= st["calls"]


def test_speculative_refuses_sampling(model):
    with pytest.raises(InputError, match="greedy-only"):
        generate(model, prompts(1), SamplingParams(temperature=0.7), strategy=SelfSpeculative(2))


def test_speculative_with_a_perfect_drafter_accepts_everything():
    m = make_model(n_layers=4, exits={"steps": [2], "trained": True})
    with torch.no_grad():  # blocks 2 and 3 add nothing: the shallow exit is the full model
        for blk in m.blocks[2:]:
            blk.attn.wo.weight.zero_()
            blk.mlp.w2.weight.zero_()
    s = SelfSpeculative(exit_step=2, k=4)
    res = generate(m, prompts(2), SamplingParams(max_new_tokens=21, ignore_eos=True), strategy=s)
    assert tokens_of(res) == tokens_of(
        generate(m, prompts(2), SamplingParams(max_new_tokens=21, ignore_eos=True))
    )
    assert s.stats()["acceptance_rate"] == 1.0 and s.stats()["tokens_per_deep_pass"] == 5.0


def test_vocabulary_pruned_drafting_stays_lossless_and_drafts_only_in_the_set(model):
    """FR-Spec: the draft head scores only the given tokens; verification keeps the output
    identical to full depth. Reference for the draft itself: the full exit's logits with
    every other token masked out."""
    from earlyexit.decoding.speculative import propose

    ps = prompts(4, seed=3)
    full = generate(model, ps, GREEDY)
    allowed = torch.tensor([7, 3, 100, 42, 5, 300, 11])
    s = SelfSpeculative(exit_step=2, k=3, draft_tokens=allowed)
    assert tokens_of(generate(model, ps, GREEDY, strategy=s)) == tokens_of(full)
    h = torch.randn(5, model.config.d_model)
    with torch.inference_mode():
        masked = torch.full((5, model.config.vocab_size), float("-inf"))
        masked[:, allowed] = model.exit_logits(h, 2)[:, allowed]
        drafted = propose(model, model.exit_norm(h, 2), s._draft_head)[0]
        assert torch.equal(drafted, masked.argmax(-1))
    # the whole vocabulary as the draft set drafts exactly what the full head drafts
    everything = SelfSpeculative(2, 3, draft_tokens=torch.arange(model.config.vocab_size))
    plain = SelfSpeculative(2, 3)
    generate(model, ps, GREEDY, strategy=everything), generate(model, ps, GREEDY, strategy=plain)
    assert everything.stats()["accepted"] == plain.stats()["accepted"]
    with pytest.raises(InputError, match="draft_vocab"):
        make_strategy(model, "speculative", exit_step=2, draft_vocab=[1, 1])


def test_frequent_tokens_ranks_by_count_then_id():
    from collections import Counter

    from earlyexit.decoding.speculative import frequent_tokens

    corpus = np.array([5, 5, 5, 2, 2, 9, 9, 1, 7, 7, 7, 7])
    ref = [t for t, _ in sorted(Counter(corpus.tolist()).items(), key=lambda kv: (-kv[1], kv[0]))]
    assert frequent_tokens(corpus, 3, 10).tolist() == ref[:3] == [7, 5, 2]
    assert frequent_tokens(corpus, 100, 10).tolist()[:5] == ref  # then the unseen ids


@pytest.mark.parametrize(
    "make",
    [
        lambda: FREE(exit_step=2, threshold=0.06),
        lambda: CALM(threshold=0.06, min_exit=2),
        lambda: CALM(threshold=0.06, min_exit=2, decay_tau=4.0),
        lambda: StaticExit(4),
        lambda: SelfSpeculative(exit_step=2, k=3),
    ],
)
def test_batched_equals_one_row_at_a_time(model, make):
    ps = prompts(4, seed=3)
    strategy = make()
    batched = generate(model, ps, GREEDY, strategy=strategy)
    depths = {d for r in batched for d in r.depths[1:]}
    if not isinstance(strategy, (StaticExit, SelfSpeculative)):
        assert len(depths) > 1, "the threshold should make some tokens exit and others not"
    for p, r in zip(ps, batched):
        single = generate(model, [p], GREEDY, strategy=make())[0]
        assert r.token_ids == single.token_ids and r.depths == single.depths


def test_rows_exit_on_their_own(model):
    s = FREE(exit_step=2, threshold=0.06)
    res = generate(
        model, prompts(4, seed=3), SamplingParams(max_new_tokens=24, ignore_eos=True), strategy=s
    )
    per_row = [tuple(r.depths) for r in res]
    assert len(set(per_row)) > 1 and 0 < s.stats()["exit_rate"] < 1


def test_calm_extremes_and_state_propagation(model):
    ps = prompts(3, seed=4)
    full = tokens_of(generate(model, ps, GREEDY))
    assert tokens_of(generate(model, ps, GREEDY, strategy=CALM(threshold=1.0, min_exit=2))) == full
    static = tokens_of(generate(model, ps, GREEDY, strategy=StaticExit(2)))
    assert (
        tokens_of(generate(model, ps, GREEDY, strategy=CALM(threshold=-1.0, min_exit=2))) == static
    )


def test_calm_propagated_kv_is_the_exit_state_projected(model):
    """After an exit at step e, every skipped step's K/V come from the exit state."""
    s = CALM(threshold=-1.0, min_exit=2)  # every generated token exits at step 2
    p = prompts(1, seed=5)[0]
    cache_box = {}
    orig = s.decode

    def spy(m, cache, tokens, n_new=None):
        cache_box["c"] = cache
        return orig(m, cache, tokens, n_new)

    s.decode = spy
    res = generate(model, [p], SamplingParams(max_new_tokens=3, ignore_eos=True), strategy=s)[0]
    cache = cache_box["c"]
    tok = res.token_ids[0]  # the first decoded input (fed at position len(p))
    with torch.inference_mode():
        ref = KVCache.for_model(model, 1, len(p) + 2)
        model(torch.tensor([p]), cache=ref)  # the prompt's context, at full depth
        ctx = model.context(torch.tensor([[len(p)]]), ref)
        h = model.run_steps(0, 2, model.embed(torch.tensor([[tok]])), ctx)  # the exit state
        cfg = model.config
        for j in range(2, 6):
            blk = model.blocks[model.plan[j].block]
            xn = rms(h[0], blk.attn_norm.weight, cfg.norm_eps)  # (1, d)
            kv = xn @ blk.attn.wqkv.weight[blk.attn.q_dim :].T  # (1, 2 kv_dim)
            k = kv[:, : blk.attn.kv_dim].view(1, cfg.n_kv_heads, cfg.head_dim)
            v = kv[:, blk.attn.kv_dim :].view(1, cfg.n_kv_heads, cfg.head_dim)
            k = rope(k, torch.tensor([len(p)]), cfg.rope_theta)  # keys are cached rotated
            slot = model.plan[j].kv_slot
            torch.testing.assert_close(cache.v[slot][0, :, len(p)], v[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.k[slot][0, :, len(p)], k[0], atol=1e-5, rtol=0)


def test_naive_batched_exit_waits_for_the_least_confident_row(model):
    s = CALM(threshold=0.06, min_exit=2, sync_batch=True)
    res = generate(
        model, prompts(4, seed=3), SamplingParams(max_new_tokens=12, ignore_eos=True), strategy=s
    )
    for t in range(1, 12):  # every decode step: all rows left at the same depth
        assert len({r.depths[t] for r in res}) == 1


def test_strategy_validation(model):
    with pytest.raises(InputError, match="unknown strategy"):
        make_strategy(model, "medusa")
    with pytest.raises(InputError, match="outside the model's depth"):
        make_strategy(model, "free", exit_step=6)
    with pytest.raises(InputError, match="threshold must be a number in"):
        make_strategy(model, "free", threshold=1.5)
    with pytest.raises(InputError, match="exit classifiers"):
        make_strategy(model, "calm", measure="classifier")
    with pytest.raises(InputError, match="no exit points"):
        make_strategy(make_model(), "free")
    # untrained exits: refused for lossy strategies, allowed explicitly with a warning
    with pytest.raises(InputError, match="never trained"):
        make_strategy(make_model(exits={"steps": [2]}), "free")
    with pytest.warns(ExitWarning, match="never trained"):
        make_strategy(make_model(exits={"steps": [2]}), "free", allow_untrained=True)
    with pytest.raises(InputError, match="not an exit point"):
        make_strategy(model, "static", exit_step=3)
    with pytest.warns(ExitWarning, match="not an exit point"):
        make_strategy(model, "static", exit_step=3, allow_untrained=True)


def test_free_with_a_classifier_confidence():
    m = make_model(
        n_layers=6, exits={"steps": [2], "classifier": True, "trained": True}, init_std=0.3
    )
    ps = prompts(3, seed=6)
    full = tokens_of(generate(m, ps, GREEDY))
    assert tokens_of(generate(m, ps, GREEDY, strategy=FREE(2, 1.0, measure="classifier"))) == full
    static = tokens_of(generate(m, ps, GREEDY, strategy=StaticExit(2)))
    assert (
        tokens_of(generate(m, ps, GREEDY, strategy=FREE(2, -1.0, measure="classifier"))) == static
    )
    mixed = FREE(2, 0.5, measure="classifier")
    res = generate(m, ps, GREEDY, strategy=mixed)
    for p, r in zip(ps, res):  # deep tokens are still the full model's
        with torch.inference_mode():
            logits = m(torch.tensor([p + r.token_ids]))[0]
        for t, (tok, d) in enumerate(zip(r.token_ids, r.depths)):
            if d == 6:
                assert tok == int(logits[len(p) - 1 + t].argmax())


def test_free_finished_rows_do_not_block_the_plain_step(model, monkeypatch):
    """A row that finished right after an exit keeps its stack forever (nothing catches it
    up); the live rows' steps without exits or pending states are still plain full-depth
    steps, without the stack machinery."""
    monkeypatch.setattr(free_mod, "confidence", _Scripted([[1, 0, 0, 0], [0, 0, 0, 0]]))
    s = FREE(exit_step=2, threshold=0.5)
    cache = KVCache.for_model(model, 2, 16)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with torch.inference_mode():
        s.begin(model, cache, 2, 8)
        s.prefill(model, cache, tokens, np.array([3, 3]))
        out = s.decode(model, cache, torch.tensor([1, 2]))  # row 0 exits, row 1 goes deep
        assert out.depths == [2, 6] and s.n_stack.tolist() == [1, 0]
        finished = cache.lengths[:, 0].copy()
        for _ in range(3):  # row 0 has finished; row 1 goes on without exiting
            s.decode(model, cache, torch.tensor([0, 3]), np.array([0, 1]))
    assert s.stats()["plain_steps"] == 3
    np.testing.assert_array_equal(cache.lengths[:, 0], finished)  # nothing written for it


def test_the_sample_log_stops_growing_once_the_threshold_is_frozen():
    bmm = BetaMixtureThreshold(max_fits=2)
    bmm.observe([0.2, 0.9], [0, 1])
    bmm.start_sequences(2)  # the last refit: the threshold is frozen from now on
    assert bmm.state()["frozen"]
    n = len(bmm.conf)
    for _ in range(5):
        bmm.observe([0.5] * 100, [1] * 100)
    assert len(bmm.conf) == len(bmm.agree) == n and bmm.state()["samples"] == n


@pytest.mark.parametrize("kind", ["generate", "classifier", "engine"])
def test_free_exits_only_strictly_above_the_threshold(model, monkeypatch, kind):
    """FREE exits iff confidence > lambda (free.md §2): a confidence equal to the threshold
    goes deep; one just above exits."""
    from earlyexit.engine import ExitMode, LLMEngine
    from earlyexit.engine.runner import ModelRunner

    def half(*args, **kw):
        rows = args[0] if kind == "engine" else (args[4] if kind == "classifier" else args[1])
        return torch.full((rows.shape[0],), 0.5)

    measure = "margin"
    if kind == "classifier":
        measure = "classifier"
        model = make_model(
            n_layers=6, exits={"steps": [2], "classifier": True, "trained": True}, init_std=0.3
        )
        monkeypatch.setattr(free_mod, "confidence", half)
    elif kind == "generate":
        monkeypatch.setattr(free_mod, "confidence", half)
    else:
        monkeypatch.setattr(
            ModelRunner, "confidences", lambda self, measure, rows, step, logits: half(logits)
        )
    ps = prompts(2, seed=8)
    for lam, depth in [(0.5, 6), (0.4999, 2)]:
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        if kind != "engine":
            strategy = FREE(exit_step=2, threshold=lam, measure=measure)
            res = generate(model, ps, params, strategy=strategy)
            depths = [r.depths[1:] for r in res]
        else:
            eng = LLMEngine(model, policy="depthwise", max_batch=2, max_len=32)
            depths = [r.depths[1:] for r in eng.generate(ps, params, ExitMode(2, lam))]
        assert all(d == [depth] * 4 for d in depths), (lam, depths)


def test_free_calibration_labels_are_agreement_at_each_stacked_position(model, monkeypatch):
    """free.md §3: at a deep pass over a stack, each stacked token and the trigger log
    y = [shallow argmax == deep argmax] at *its own* position, checked here against an
    uncached teacher-forced forward over the emitted sequence."""
    pattern = [[1, 1, 0], [1, 0], [0, 1, 1, 1, 0]]
    monkeypatch.setattr(free_mod, "confidence", _Scripted(pattern))
    s = FREE(exit_step=2, threshold=0.5, adaptive=True)
    ps = prompts(3, seed=7)
    res = generate(model, ps, SamplingParams(max_new_tokens=14, ignore_eos=True), strategy=s)
    expected = []
    agree = []
    for p, r in zip(ps, res):
        with torch.inference_mode():
            out = model(torch.tensor([p + r.token_ids]), exits=True)
        shallow, deep = out.exit_logits[0][0].argmax(-1), out.exit_logits[-1][0].argmax(-1)
        agree.append((shallow == deep).tolist())
    for t in range(1, 14):  # decode steps, rows in batch order within a step
        for b, (p, r) in enumerate(zip(ps, res)):
            if r.depths[t] == 6:  # a deep pass at position len(p) - 1 + t
                stack = []
                u = t - 1
                while u >= 1 and r.depths[u] == 2:  # the exits since the last deep pass
                    stack.insert(0, len(p) - 1 + u)
                    u -= 1
                if stack:
                    expected += [agree[b][q] for q in [*stack, len(p) - 1 + t]]
    assert s.calibrator.agree == expected
    assert 0 < sum(expected) < len(expected)  # both labels occur: a shift would show


def test_beta_mixture_threshold_is_the_smallest_grid_value_whose_posterior_passes():
    """free.md §3 with a monotone posterior: lambda is the smallest of 10 points on
    [0.3, 0.9] where P(agree | c) > 0.4 under method-of-moments Beta fits per class."""

    def fit(x):
        m, v = x.mean(), x.var()
        a = m * (m * (1 - m) / v - 1)
        return a, a * (1 - m) / m

    def log_pdf(x, a, b):
        return (
            (a - 1) * np.log(x)
            + (b - 1) * np.log1p(-x)
            - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
        )

    grid = np.linspace(0.3, 0.9, 10)
    seen = set()
    for a_agree in (3.0, 5.0, 7.0, 10.0):
        rng = np.random.default_rng(0)
        agree, disagree = rng.beta(a_agree, 2.0, 4000), rng.beta(2.0, 5.0, 4000)
        (a1, b1), (a0, b0) = fit(agree), fit(disagree)
        post = 1 / (1 + np.exp(log_pdf(grid, a0, b0) - log_pdf(grid, a1, b1)))
        assert (np.diff(post) > 0).all() and (abs(post - 0.4) > 0.02).all()
        passing = grid[post > 0.4]
        want = float(passing.min()) if len(passing) else 0.9
        bmm = BetaMixtureThreshold(initial=0.77)
        bmm.observe(list(agree) + list(disagree), [1] * 4000 + [0] * 4000)
        bmm.start_sequences()
        assert abs(bmm.value - want) < 1e-9, (a_agree, bmm.value, want)
        seen.add(round(want, 3))
    assert len(seen - {0.3, 0.9}) >= 2  # interior grid points: an index shift would show


def reference_refit(conf, agree, initial):
    """free.md §3 written out: hard-label (0.9995 / 0.0005) weighted moment fits per class
    on confidences clipped to [1e-4, 1 - 1e-4], the equal-prior posterior of the
    higher-mean component on the grid (computed stably), lambda = grid[clamp(10 - k)]."""
    y = np.asarray(agree)
    if len(y) < 2 or y.min() == y.max():
        return initial, None
    x = np.clip(np.asarray(conf, dtype=float), 1e-4, 1 - 1e-4)

    def fit(w):
        w = w / w.sum()
        m = (w * x).sum()
        v = max((w * (x - m) ** 2).sum(), 1e-12)
        a = max(m * (m * (1 - m) / v - 1), 1e-6)
        return a, max(a * (1 - m) / m, 1e-6)

    def log_pdf(g, a, b):
        return (
            (a - 1) * np.log(g)
            + (b - 1) * np.log(1 - g)
            - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
        )

    r = np.where(y == 1, 0.9995, 0.0005)
    dis, agr = fit(1 - r), fit(r)
    hi, lo = (agr, dis) if agr[0] / sum(agr) >= dis[0] / sum(dis) else (dis, agr)
    grid = np.linspace(0.3, 0.9, 10)
    la, lb = log_pdf(grid, *hi), log_pdf(grid, *lo)
    post = np.exp(la - np.logaddexp(la, lb))
    k = int((post > 0.4).sum())
    return float(grid[min(max(10 - k, 0), 9)]), (dis, agr)


def _calibration_sets():
    rng = np.random.default_rng(3)
    sets = {}
    for a in (1.5, 3.0, 6.0, 12.0):  # ordinary: agreeing tokens more confident
        sets[f"agree-beta-{a}"] = (
            [*rng.beta(a, 2.0, 300), *rng.beta(2.0, 5.0, 300)],
            [1] * 300 + [0] * 300,
        )
    # inverted: agreement at *low* confidence (the higher-mean component is "disagree")
    sets["inverted"] = ([*rng.beta(2, 6, 200), *rng.beta(6, 2, 200)], [1] * 200 + [0] * 200)
    # every grid point passes (lambda 0.3) / none does (lambda 0.9, posteriors underflow)
    sets["all-pass"] = ([*rng.beta(3, 1, 200), *rng.beta(1, 30, 200)], [1] * 200 + [0] * 200)
    sets["none-pass"] = (
        [*(0.97 + 1e-4 * rng.standard_normal(200)), *rng.beta(2, 2, 200)],
        [1] * 200 + [0] * 200,
    )
    # the agree component has the larger mean but the smaller a (a + b)
    sets["mean-not-size"] = ([*rng.beta(2, 0.5, 300), *rng.beta(5, 20, 300)], [1] * 300 + [0] * 300)
    # confidences of exactly 0 and 1 (clipped), and U-shaped classes (a < 1)
    sets["edges"] = ([0.0, 1.0, 1.0, 0.95, 0.0, 0.3, 1.0, 0.02], [1, 1, 1, 1, 0, 0, 0, 0])
    sets["u-shaped"] = ([*rng.beta(0.5, 0.4, 300), *rng.beta(0.3, 0.6, 300)], [1] * 300 + [0] * 300)
    # an agree component so concentrated that its density underflows on the whole grid
    sets["extreme"] = ([*(0.97 + 1e-5 * rng.standard_normal(2000)), 0.2, 0.5], [1] * 2000 + [0, 0])
    sets["two-samples"] = ([0.2, 0.9], [0, 1])
    sets["one-class"] = ([0.2, 0.9, 0.5], [1, 1, 1])
    return sets


@pytest.mark.parametrize("name", list(_calibration_sets()))
def test_beta_mixture_refit_equals_the_written_out_rule(name):
    conf, agree = _calibration_sets()[name]
    want, fits = reference_refit(conf, agree, initial=0.77)
    bmm = BetaMixtureThreshold(initial=0.77)
    bmm.observe(list(conf), list(agree))
    assert bmm.start_sequences() == pytest.approx(want, abs=1e-12)
    st = bmm.state()
    assert st["threshold"] == bmm.value and st["initial"] == 0.77 and st["sequences"] == 1
    assert st["samples"] == len(conf) and st["agree_rate"] == pytest.approx(np.mean(agree))
    assert st["fits"] == (fits is not None) and not st["frozen"]
    if fits is None:
        assert st["beta_disagree"] is None and st["beta_agree"] is None
    else:
        np.testing.assert_allclose(st["beta_disagree"], fits[0], rtol=1e-9)
        np.testing.assert_allclose(st["beta_agree"], fits[1], rtol=1e-9)
        bmm.start_sequences(3)  # refits again: the fit counter counts
        assert bmm.state()["fits"] == 2 and bmm.state()["sequences"] == 4


def test_beta_pieces_against_closed_forms():
    from earlyexit.decoding.threshold import beta_logpdf

    # Beta(2, 3) pdf is 12 x (1 - x)^2; Beta(0.5, 0.5) is 1 / (pi sqrt(x (1 - x)))
    for x in (0.1, 0.5, 0.8):
        assert math.exp(beta_logpdf(x, 2.0, 3.0)) == pytest.approx(12 * x * (1 - x) ** 2)
        want = 1 / (math.pi * math.sqrt(x * (1 - x)))
        assert math.exp(beta_logpdf(x, 0.5, 0.5)) == pytest.approx(want)
    assert BetaMixtureThreshold().state()["agree_rate"] is None  # no samples yet
    rng = np.random.default_rng(1)
    a, b = beta_moments(rng.beta(0.5, 0.7, 200_000), np.ones(200_000))  # alpha, beta < 1
    assert abs(a - 0.5) < 0.02 and abs(b - 0.7) < 0.03


@pytest.mark.parametrize("sync", [False, True])
def test_free_stats_and_finished_rows_caches(model, monkeypatch, sync):
    """One decode step by hand: the counters FREE reports, and a finished row's cache does
    not grow while the other row goes on (nor, with ``sync_batch``, outvotes it)."""
    monkeypatch.setattr(free_mod, "confidence", _Scripted([[1, 0, 1, 0], [0, 0, 0, 0]]))
    s = FREE(exit_step=2, threshold=0.5, sync_batch=sync)
    cache = KVCache.for_model(model, 2, 16)
    with torch.inference_mode():
        s.begin(model, cache, 2, 8)
        s.prefill(model, cache, torch.tensor([[5, 6, 7], [8, 9, 10]]), np.array([3, 3]))
        s.decode(model, cache, torch.tensor([1, 2]), np.array([1, 0]))  # row 1 has finished
        assert s.stats() == {
            "exit_step": 2,
            "threshold": 0.5,
            "exit_rate": 1.0,
            "exit_vocab": None,
            "sync_batch": sync,
            "tokens": 1,
            "shallow": 1,
            "deep_passes": 0,
            "caught_up": 0,
            "plain_steps": 0,
            "outvoted": 0,
            "fallback": None,
        }
        before = cache.lengths[:, 1].copy()
        s.decode(model, cache, torch.tensor([3, 2]), np.array([1, 0]))  # row 0 goes deep
        np.testing.assert_array_equal(cache.lengths[:, 1], before)
        st = s.stats()
        assert (st["tokens"], st["shallow"], st["deep_passes"], st["caught_up"]) == (2, 1, 1, 1)
        assert st["exit_rate"] == 0.5
        s.decode(model, cache, torch.tensor([4, 2]), np.array([1, 0]))  # exits again
        s.decode(model, cache, torch.tensor([5, 2]), np.array([1, 0]))  # deep over 1 stacked
    st = s.stats()
    assert (st["tokens"], st["shallow"], st["deep_passes"], st["caught_up"]) == (4, 2, 2, 2)


def test_free_calibration_logs_each_rows_confidences_in_order(model, monkeypatch):
    """Two rows going deep in the same step both log their pairs (stacked confidences, then
    the trigger's), in row order."""
    monkeypatch.setattr(free_mod, "confidence", _Scripted([[1, 1, 0], [1, 0, 0]]))
    s = FREE(exit_step=2, threshold=0.5, adaptive=True)
    generate(model, prompts(2), SamplingParams(max_new_tokens=4, ignore_eos=True), strategy=s)
    # step 2: row 1 goes deep over 1 stacked token; step 3: row 0 over 2 (row 1: empty stack)
    assert s.calibrator.conf == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert len(s.calibrator.agree) == 5


def test_free_adaptive_with_a_classifier_and_in_bf16():
    """Adaptive FREE with the classifier measure calibrates (it needs the shallow argmaxes
    the classifier-only path skips); FREE runs on a bf16 model (its stack has the model's
    dtype), deep passes included."""
    m = make_model(n_layers=6, exits={"steps": [2], "classifier": True, "trained": True})
    s = FREE(2, 0.5, adaptive=True, measure="classifier")
    generate(m, prompts(3, seed=6), GREEDY, strategy=s)
    assert len(s.calibrator.conf) == len(s.calibrator.agree) > 0
    bf = m.to(torch.bfloat16)  # the classifier path returns logits in the model's dtype
    cache = KVCache.for_model(bf, 2, 8)
    c = FREE(2, 0.5, measure="classifier")
    with torch.inference_mode():
        c.begin(bf, cache, 2, 4)
        c.prefill(bf, cache, torch.tensor([[1, 2], [3, 4]]), np.array([2, 2]))
        assert c.decode(bf, cache, torch.tensor([5, 6])).logits.dtype == torch.bfloat16
    half = make_model(n_layers=6, exits={"steps": [2], "trained": True}, init_std=0.3)
    half = half.to(torch.bfloat16)
    s = FREE(2, 0.06)
    res = generate(half, prompts(3, seed=3), GREEDY, strategy=s)
    assert s.stats()["caught_up"] > 0 and all(len(r.token_ids) == 16 for r in res)


def test_free_defaults():
    s = FREE(2)
    assert s.threshold == s.current_threshold == 0.9 and s.calibrator is None
    a = FREE(2, 0.7, adaptive=True)
    assert a.current_threshold == a.calibrator.initial == 0.7


def test_free_exits_use_the_exit_norm_and_classifier_rows_alone(monkeypatch):
    """With per-exit norms, an exited token is the argmax of *that exit's* logits (norm +
    head), checked against a teacher-forced forward; on the classifier path any subset of
    rows may exit in one step, and rows that do not exit never pay for the exit head."""
    m = make_model(
        n_layers=6,
        exits={"steps": [2], "norms": True, "classifier": True, "trained": True},
        init_std=0.3,
    )
    with torch.no_grad():
        m.exit_norms[0].weight.normal_(1.0, 0.5)  # an exit norm unlike the final one

    def check(res, ps):
        exited = 0
        for p, r in zip(ps, res):
            with torch.inference_mode():
                out = m(torch.tensor([p + r.token_ids]), exits=True)
            for t, (tok, d) in enumerate(zip(r.token_ids, r.depths)):
                want = out.exit_logits[0 if d == 2 else -1][0, len(p) - 1 + t].argmax()
                assert tok == int(want), (t, d)
                exited += d == 2
        return exited

    ps = prompts(3, seed=9)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert check(generate(m, ps, params, strategy=FREE(2, -1.0)), ps) == 15  # margin path
    # classifier path: two of three rows exit at every step
    monkeypatch.setattr(free_mod, "confidence", _Scripted([[1], [0], [1]]))
    calls = []
    orig = m.exit_logits
    m.exit_logits = lambda h, step, pruned=None, ctx=None: (
        calls.append(h.shape[0]) or orig(h, step, pruned, ctx)
    )
    res = generate(m, ps, params, strategy=FREE(2, 0.5, measure="classifier"))
    assert set(calls) == {2}  # only the exiting rows' heads, never all three
    assert check(res, ps) == 10
    # rows exiting together: the middle row outvotes the others every step, so nobody
    # exits and nobody pays for the exit head
    calls.clear()
    res = generate(m, ps, params, strategy=FREE(2, 0.5, measure="classifier", sync_batch=True))
    assert calls == [] and check(res, ps) == 0


def _run_scripted(monkeypatch, pattern, n_rows, **free_kwargs):
    model = make_model(n_layers=6, exits={"steps": [2, 4], "trained": True})
    monkeypatch.setattr(free_mod, "confidence", _Scripted(pattern))
    ps = prompts(n_rows, seed=3)
    s = FREE(exit_step=2, threshold=0.5, **free_kwargs)
    res = generate(model, ps, SamplingParams(max_new_tokens=12, ignore_eos=True), strategy=s)
    return model, ps, s, res


def test_free_batch_fallback_goes_full_depth_and_stays_exact(monkeypatch):
    """Two rows that never exit together: the deep pass runs every step, so after the probe
    the batch falls back; every later token is the full model's argmax (uncached forward on
    the emitted prefix), stacks are caught up, and the earlier tokens are FREE's own."""
    pattern = [[1, 0], [0, 1]]
    model, ps, s, res = _run_scripted(monkeypatch, pattern, 2, min_sync_rate=0.5, probe_steps=3)
    _, _, s_ref, ref = _run_scripted(monkeypatch, pattern, 2, min_sync_rate=None)
    assert s.stats()["fallback"] and s_ref.stats()["fallback"] is None
    L = model.n_steps
    for r, r_ref, p in zip(res, ref, ps):
        # token 0 comes from the prefill; decode steps 1-2 are decided as without fallback;
        # after step 2 no third step can lift the share of skipped steps to 50% of 3, so
        # from then on every token runs full depth
        assert r.token_ids[:3] == r_ref.token_ids[:3] and r.depths[:3] == r_ref.depths[:3]
        assert r.depths[3:] == [L] * (len(r.depths) - 3)
        assert any(d < L for d in r.depths[1:3])  # the probe really exited
        with torch.inference_mode():
            full_logits = model(torch.tensor([p + r.token_ids]))[0]
        for t in range(3, len(r.token_ids)):
            assert r.token_ids[t] == int(full_logits[len(p) - 1 + t].argmax())
    assert not s.n_stack.any()  # stacks caught up: deep KV complete
    assert s.counts["plain_steps"] >= len(res[0].token_ids) - 5


def test_free_batch_fallback_keeps_exits_that_pay(monkeypatch):
    """All rows exiting together skip the deep pass: no fallback; a single row never falls
    back (nothing to synchronize), even when it never exits."""
    _, _, s, res = _run_scripted(monkeypatch, [[1], [1]], 2, min_sync_rate=0.5, probe_steps=3)
    assert s.stats()["fallback"] is None and all(d == 2 for r in res for d in r.depths[1:])
    _, _, s1, _ = _run_scripted(monkeypatch, [[0]], 1, min_sync_rate=1.0, probe_steps=1)
    assert s1.stats()["fallback"] is None


def test_free_batch_fallback_options_are_validated():
    model = make_model(n_layers=6, exits={"steps": [2, 4], "trained": True})
    with pytest.raises(InputError, match="min_sync_rate"):
        make_strategy(model, "free", min_sync_rate=1.5)
    with pytest.raises(ValueError, match="probe_steps"):
        FREE(2, probe_steps=0)
    assert make_strategy(model, "free").min_sync_rate == 0.5
    # lock-step defaults: FREE's rows exit together, CALM's each on its own
    assert make_strategy(model, "free").sync_batch is True
    assert make_strategy(model, "free", sync_batch=False).sync_batch is False
    assert make_strategy(model, "calm").sync_batch is False
    assert make_strategy(model, "free", min_sync_rate=None).min_sync_rate is None


@pytest.mark.parametrize("rate, falls_back", [(0.5, False), (0.75, True)])
def test_free_batch_fallback_threshold_is_a_share_of_probe_steps(monkeypatch, rate, falls_back):
    """2 of 4 probe steps skip the deep pass (both rows exit): a 50% floor keeps exits."""
    pattern = [[1, 1, 0, 0], [1, 1, 1, 1]]
    _, _, s, _ = _run_scripted(monkeypatch, pattern, 2, min_sync_rate=rate, probe_steps=4)
    assert (s.stats()["fallback"] is not None) == falls_back


# ---------------------------------------------------------------------- pruned exit head
ALLOWED = torch.tensor([7, 3, 100, 42, 5, 300, 11, 250, 499, 64, 1, 77])


def _margin(logits):
    p = logits.double().softmax(-1).sort(descending=True).values
    return float(p[0] - p[1])


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_free_with_a_pruned_exit_head_follows_the_pruned_decision_rule(model, threshold):
    """Reference, from an uncached teacher-forced forward over what was emitted: a token
    emitted at the exit is the argmax of the exit's logits over the allowed ids only, and
    that softmax's margin (over the allowed ids alone) passed the threshold; a token
    decided deep is the full model's argmax, and the pruned margin did not pass."""
    ps = prompts(4, seed=5)
    s = FREE(exit_step=2, threshold=threshold, exit_vocab=ALLOWED)
    res = generate(model, ps, SamplingParams(max_new_tokens=12, ignore_eos=True), strategy=s)
    kinds = set()
    for p, r in zip(ps, res):
        with torch.inference_mode():
            out = model(torch.tensor([p + r.token_ids]), exits=True)
        for t, (tok, depth) in enumerate(zip(r.token_ids, r.depths)):
            pos = len(p) - 1 + t
            if t == 0:  # the prefill's token runs full depth
                assert depth == model.n_steps
                continue
            sub = out.exit_logits[0][0, pos, ALLOWED]  # the exit after 2 steps, allowed ids
            if depth == 2:
                assert tok == int(ALLOWED[sub.argmax()]) and _margin(sub) > threshold
            else:
                assert tok == int(out.exit_logits[-1][0, pos].argmax())
                assert _margin(sub) <= threshold + 1e-6
            kinds.add(depth)
    assert kinds == {2, model.n_steps}, "the threshold should split the tokens"
    assert s.stats()["exit_vocab"] == len(ALLOWED)


def test_free_with_the_whole_vocabulary_as_exit_head_equals_plain_free(model):
    """A pruned head over every id (in any order) is the full head: same tokens, depths."""
    ps = prompts(3, seed=6)
    plain = generate(model, ps, GREEDY, strategy=FREE(2, 0.06))
    perm = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    pruned = generate(model, ps, GREEDY, strategy=FREE(2, 0.06, exit_vocab=perm))
    assert tokens_of(pruned) == tokens_of(plain)
    assert [r.depths for r in pruned] == [r.depths for r in plain]


def test_pruned_head_logits_and_refresh_after_the_head_changes(model):
    """Masked full-head logits as the reference; an in-place weight update is seen."""
    from earlyexit.models.heads import PrunedHead

    head = PrunedHead(ALLOWED)
    h = torch.randn(3, 5, model.config.d_model)
    with torch.inference_mode():
        ref = torch.full((3, 5, model.config.vocab_size), float("-inf"))
        ref[..., ALLOWED] = model.exit_logits(h, 2)[..., ALLOWED]
        torch.testing.assert_close(model.exit_logits(h, 2, head), ref)
    with torch.no_grad():
        model.head_weight()[ALLOWED[0]] += 1.0  # in place: the cached rows must follow
    with torch.inference_mode():
        got = model.exit_logits(h, 2, head)[..., ALLOWED[0]]
        torch.testing.assert_close(got, model.exit_logits(h, 2)[..., ALLOWED[0]])


def test_exit_vocab_is_validated(model):
    with pytest.raises(InputError, match="exit_vocab"):
        make_strategy(model, "free", exit_step=2, exit_vocab=[1, 1])
    with pytest.raises(InputError, match="exit_vocab"):
        make_strategy(model, "free", exit_step=2, exit_vocab=[0, 512])
    with pytest.raises(InputError, match="free strategy"):
        make_strategy(model, "static", exit_step=2, exit_vocab=[1, 2])
    with pytest.raises(InputError, match="draft_vocab"):
        make_strategy(model, "speculative", exit_step=2, exit_vocab=[1, 2])
    s = make_strategy(model, "free", exit_step=2, exit_vocab=[4, 2])
    assert s.stats()["exit_vocab"] == 2


@pytest.mark.parametrize("deep_kv", ["propagate", "skip"])
def test_calm_deep_kv_against_a_layer_by_layer_reference(deep_kv):
    """What an exited token leaves in the layers it skipped, checked against a slow
    reference built from the paper's rule with ``tests.reference.layer``: at each layer the
    keys are the positions that ran it (skip), or those plus every exited position with its
    exit state as the layer's input (propagate: CALM's state propagation). Each emitted
    token must be the argmax at its own depth, and the exit decision its margin's."""
    from tests.reference import layer

    model = make_model(n_layers=6, exits={"steps": [2], "trained": True}, init_std=0.3)
    cfg, L, K, lam = model.config, 6, 2, 0.05
    ps = prompts(3, seed=11)
    s = CALM(lam, K, deep_kv=deep_kv)
    res = generate(model, ps, SamplingParams(max_new_tokens=10, ignore_eos=True), strategy=s)
    checked = exited = 0
    for p, r in zip(ps, res):
        seq = torch.tensor(p + r.token_ids[:-1])  # inputs of every position
        n = len(seq)
        # depth of each position: the prompt (and the prefill's token) ran every layer
        depth = [L] * len(p) + list(r.depths[1:])
        pos = torch.arange(n)
        with torch.no_grad():
            h = model.embed(seq[None])[0]  # (n, d)
            states = {0: h}
            for j in range(L):
                ran = torch.tensor([d > j for d in depth])
                x = h.clone()
                keys = ran.clone()
                if deep_kv == "propagate" and j >= K:  # exited: exit state stands in
                    gone = ~ran
                    x[gone] = states[K][gone]
                    keys = torch.ones(n, dtype=torch.bool)
                out, _ = layer(cfg, model.blocks[j], x[keys], pos[keys])
                h = h.clone()
                h[ran] = out[ran[keys]]
                states[j + 1] = h
            for t in range(1, len(r.token_ids)):
                i = len(p) - 1 + t  # the position that produced token t
                ex = model.exit_logits(states[K][i], K)
                top = ex.softmax(-1).topk(2).values
                margin = float(top[0] - top[1])
                if abs(margin - lam) < 1e-4:
                    continue  # too close to the threshold to call
                want_depth = K if margin >= lam else L
                assert r.depths[t] == want_depth, (t, margin)
                lg = ex if want_depth == K else model.logits(states[L][i])
                two = lg.topk(2).values
                if float(two[0] - two[1]) > 1e-4:
                    assert r.token_ids[t] == int(lg.argmax()), (deep_kv, t)
                checked += 1
                exited += want_depth == K
    assert checked > 15 and 0 < exited < checked
