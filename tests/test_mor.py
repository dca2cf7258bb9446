"""Mixture-of-Recursions: mor.md §8 invariants, causal inference, losses, FLOP accountant."""

import dataclasses
import math

import pytest
import torch

from earlyexit.config import ModelConfig, RouterConfig
from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.errors import ConfigError
from earlyexit.models.decoder import Decoder
from earlyexit.models.kv_cache import KVCache
from earlyexit.models.routers import balance_loss, expert_aux_loss, z_loss
from earlyexit.training.flops import forward_flops_per_token, steps_for_budget
from tests.conftest import make_model

MOR = dict(n_layers=8, sharing={"scheme": "middle_cycle", "loops": 3})


def mor_model(kind="expert", seed=0, **kw):
    m = make_model(**MOR, router={"kind": kind, **kw}, init_std=0.1)
    # Routers with real spread: some tokens pass, some do not. Their own generator: drawn
    # from the global RNG, they depended on what earlier-collected modules had drawn, and a
    # clean CI clone (fewer optional packages) got routers that sent every token full depth.
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in m.routers.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return m


def test_parameter_counts_of_the_360m_shapes():
    for loops, millions in [(3, 118), (2, 167)]:
        cfg = ModelConfig.from_name(
            "smollm-360m", sharing={"scheme": "middle_cycle", "loops": loops}
        )
        assert round(cfg.param_counts()["non_embedding"] / 1e6) == millions


def test_capacity_one_with_replace_gating_is_the_recursive_model():
    m = mor_model(capacities=[1.0, 1.0, 1.0], gating="replace")
    plain_cfg = dataclasses.replace(m.config, router=RouterConfig())
    plain = Decoder(plain_cfg).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("routers.")})
    x = torch.randint(0, 512, (2, 11))
    with torch.inference_mode():
        for mode in ("train", "causal"):
            torch.testing.assert_close(m(x, routing=mode), plain(x), atol=0, rtol=0)


def test_training_selection_keeps_k_per_recursion_hierarchically():
    m = mor_model()
    T = 12
    x = torch.randint(0, 512, (3, T))
    out = m(x, routing="train", return_routing=True)
    for r, cap in enumerate(m.config.capacities):
        k = max(1, math.floor(cap * T))
        assert ((out.recursions >= r + 1).sum(1) == k).all()  # S_r has k_r tokens, S_r ⊆ S_{r-1}
    assert out.aux_loss > 0 and 0 <= out.metrics["router_accuracy@2"] <= 1
    g = m.routers.gate(torch.linspace(-10, 10, 101))
    assert (g > 0).all() and (g < 0.1).all()  # g in (0, alpha)


def test_causal_routing_is_causal_and_top_k_is_not():
    m = mor_model()
    x = torch.randint(0, 512, (1, 16))
    y = x.clone()
    y[0, 10:] = torch.randint(0, 512, (6,))
    with torch.inference_mode():
        a, b = m(x, routing="causal"), m(y, routing="causal")
        # fp32 reductions over different later tokens may differ in the last bits; a leak
        # moves logits by far more than 1e-5 (the top-k check below sees > 1e-4)
        torch.testing.assert_close(a[0, :10], b[0, :10], atol=1e-5, rtol=0)
        leaks = any(
            (m(x, routing="train")[0, :10] - m(z, routing="train")[0, :10]).abs().max() > 1e-4
            for z in (y, torch.cat([x[:, :10], torch.randint(0, 512, (1, 6))], 1))
        )
    assert leaks, (
        "top-k routing looks at the whole sequence, so later tokens leak into earlier ones"
    )


@pytest.mark.parametrize("kind", ["expert", "token"])
def test_incremental_decoding_equals_the_full_causal_forward(kind):
    m = mor_model(kind)
    x = torch.randint(0, 512, (2, 14))
    cache = KVCache.for_model(m, 2, 16)
    with torch.inference_mode():
        full = m(x, routing="causal", return_routing=True)
        outs = [m(x[:, :6], cache=cache)]
        outs += [m(x[:, t : t + 1], cache=cache) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(outs, 1), full.logits, atol=1e-5, rtol=0)
    # each recursion's KV slots hold exactly the tokens that reached it
    for step in m.plan:
        reached = (
            (full.recursions >= step.recursion + 1)
            if step.recursion is not None
            else torch.ones_like(full.recursions, dtype=torch.bool)
        )
        assert cache.lengths[step.kv_slot].tolist() == reached.sum(1).tolist()
    assert len(set(full.recursions.flatten().tolist())) > 1  # routing really varies


def test_batched_padded_generation_equals_one_at_a_time():
    m = mor_model()
    ps = [[5, 6, 7], [9] * 8, [1, 2]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batched = generate(m, ps, params)
    for p, r in zip(ps, batched):
        single = generate(m, [p], params)[0]
        assert r.token_ids == single.token_ids and r.depths == single.depths
    assert all(d in (4, 6, 8) for r in batched for d in r.depths)  # 1 + 2 x recursions + 1
    with torch.inference_mode():  # greedy tokens are the causal full forward's argmax
        logits = m(torch.tensor([ps[0] + batched[0].token_ids]))
    assert batched[0].token_ids == logits[0, 2:-1].argmax(-1).tolist()


def test_router_losses():
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    sel = torch.tensor([[True, False, False, True]])
    cand = torch.tensor([[True, True, True, False]])
    manual = torch.nn.functional.binary_cross_entropy_with_logits(z[cand], sel[cand].float())
    torch.testing.assert_close(expert_aux_loss(z, sel, cand), manual)
    n = 3
    probs = torch.full((6, n), 1 / n)
    choice = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(balance_loss(probs, choice, n), torch.tensor(1.0))
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 2
    assert abs(z_loss(logits).item() - hand) < 1e-5


def test_flop_accountant_reproduces_the_released_360m_numbers():
    def mor(n, layers, kv=False):
        return ModelConfig.from_name(
            "smollm-360m",
            n_layers=layers,
            sharing={"scheme": "middle_cycle", "loops": n},
            router={"kind": "expert"},
        ), kv

    cases = [
        ((ModelConfig.from_name("smollm-360m"), False), 833.6, 9438),
        ((ModelConfig.from_name("smollm-360m", n_layers=34), False), 885.7, 8883),
        (mor(2, 32), 623.5, 12619),
        (mor(3, 32), 555.6, 14161),
        (mor(4, 34), 553.5, 14216),
        (mor(3, 32, kv=True), 536.2, 14672),
    ]
    for (cfg, kv), mflops, steps in cases:
        assert round(forward_flops_per_token(cfg, 2048, kv) / 1e6, 1) == mflops
        assert abs(steps_for_budget(16.5e18, cfg, 2048, 2048 * 1024, kv) - steps) <= 1


def test_mor_config_errors_and_strategies():
    with pytest.raises(ConfigError, match="middle_cycle"):
        ModelConfig.from_name("tiny", router={"kind": "expert"})
    with pytest.raises(ConfigError, match="capacities"):
        ModelConfig.from_name("tiny", **MOR, router={"kind": "expert", "capacities": [1.0, 0.5]})
    from earlyexit.decoding.strategies import make_strategy
    from earlyexit.errors import InputError

    m = mor_model()
    assert make_strategy(m, "full").name == "mor"
    with pytest.raises(InputError, match="routers decide"):
        make_strategy(m, "free", exit_step=2)


def test_training_step_includes_router_losses():
    from earlyexit.training.losses import LanguageModeling

    m = mor_model().train()
    x = torch.randint(0, 512, (2, 12))
    out = LanguageModeling()(m, x, torch.roll(x, -1, 1))
    assert out.loss > out.metrics["ce"] and "router_accuracy@2" in out.metrics
    out.loss.backward()
    assert m.routers.nets[1].weight.grad.abs().sum() > 0


def test_kv_sharing_reads_the_first_recursion_and_decodes_incrementally():
    m = mor_model(kv_sharing=True)
    assert m.config.n_kv_slots == 4  # first, 2 shared blocks (recursion 1 only), last
    assert sum(s.shares_kv for s in m.plan) == 4
    x = torch.randint(0, 512, (2, 13))
    cache = KVCache.for_model(m, 2, 16)
    with torch.inference_mode():
        full = m(x, return_routing=True)
        outs = [m(x[:, :5], cache=cache)] + [m(x[:, t : t + 1], cache=cache) for t in range(5, 13)]
    torch.testing.assert_close(torch.cat(outs, 1), full.logits, atol=1e-5, rtol=0)
    assert (cache.lengths == 13).all()  # every slot holds every token: recursion 1 runs all
    y = x.clone()
    y[0, 8:] = 3
    with torch.inference_mode():  # and it is causal
        torch.testing.assert_close(m(y)[0, :8], full.logits[0, :8], atol=1e-6, rtol=0)
    # the plain recursion-wise model with the same weights differs: sharing changes the keys
    plain = make_model(**MOR, router={"kind": "expert"}, init_std=0.1)
    plain.load_state_dict(m.state_dict())
    with torch.inference_mode():
        assert (plain(x) - full.logits).abs().max() > 1e-4


def test_kv_memory_under_recursion_wise_caching_and_sharing():
    """mor.md §8.7: with the default capacities the shared blocks' KV is (N_r+1)/(2N_r) of
    per-depth caching, and 1/N_r under sharing."""
    T, n = 12, 3
    for sharing, expected in [(False, (n + 1) / (2 * n)), (True, 1 / n)]:
        m = mor_model(kv_sharing=sharing)
        cache = KVCache.for_model(m, 2, T)
        with torch.inference_mode():
            m(torch.randint(0, 512, (2, T)), cache=cache, routing="train")
        shared_slots = {s.kv_slot for s in m.plan if s.recursion is not None}
        entries = sum(int(cache.lengths[s, 0]) for s in shared_slots)
        per_depth = sum(1 for s in m.plan if s.recursion is not None) * T
        assert abs(entries / per_depth - expected) < 1 / T


def test_auxiliary_router_decides_at_inference_and_trains_fast():
    from earlyexit.training.loop import param_groups

    m = mor_model(aux_router=True).train()
    x = torch.randint(0, 512, (2, 12))
    out = m(x, routing="train", return_routing=True)
    assert "aux_router_accuracy@2" in out.metrics
    out.aux_loss.backward()
    assert m.routers.aux[1][0].weight.grad.abs().sum() > 0
    groups = param_groups(m, 0.1)
    assert groups[-1]["lr_scale"] == 10.0 and len(groups[-1]["params"]) == len(
        list(m.routers.aux.parameters())
    )
    with torch.no_grad():  # at inference the auxiliary router, not the main one, selects
        for p in m.routers.aux.parameters():
            p.zero_()
    m.eval()
    with torch.inference_mode():
        runs = m(x, return_routing=True).recursions
    assert (runs == 1).all()  # aux scores 0 -> sigmoid 0.5, not > 0.5: nobody continues


def test_loss_free_bias_moves_toward_underloaded_depths():
    m = mor_model("token", loss_free_bias=1e-3).train()
    x = torch.randint(0, 512, (2, 16))
    before = m.routers.bias.clone()
    out = m(x, routing="train", return_routing=True)
    load = torch.bincount(out.recursions.flatten() - 1, minlength=3).float()
    step = m.routers.bias - before
    assert torch.allclose(step, 1e-3 * torch.sign(load.mean() - load))
    # only a training forward that builds a graph moves it (not evaluation, not inference)
    after = m.routers.bias.clone()
    with torch.no_grad():
        m(x, routing="train")
    m(x, routing="causal")
    assert torch.equal(m.routers.bias, after)


def _recursion_outputs(m, x, r, perturb):
    """Run the top-k (training) forward; just before recursion ``r`` (0-based) add noise to
    the current states of the tokens ``perturb(sel)`` picks; return recursion r's selection
    and the outputs of its blocks for the selected tokens."""
    from earlyexit.models.mor import recursion_ranges

    rec = recursion_ranges(m.plan)[1][r]
    orig_scores, orig_run = m.routers.scores, m.run_steps
    seen = {}

    def scores(i, h):
        z = orig_scores(i, h)
        if i == r:
            cap = m.config.capacities[r]
            k = max(1, math.floor(cap * h.shape[1]))
            cand = seen.get("cand", torch.ones_like(z, dtype=torch.bool))
            top = z.masked_fill(~cand, float("-inf")).topk(k, dim=-1).indices
            sel = torch.zeros_like(cand).scatter(1, top, True) & cand
            seen["sel"] = sel
            g = torch.Generator().manual_seed(1)
            noise = torch.randn(h.shape, generator=g)
            h.add_(noise * perturb(sel)[..., None])  # in place: the forward's own `h`
        return z

    def run_steps(start, stop, h, ctx):
        out = orig_run(start, stop, h, ctx)
        if (start, stop) == (rec.start, rec.stop):
            seen["out"] = out.clone()
        return out

    m.routers.scores, m.run_steps = scores, run_steps
    try:
        with torch.no_grad():
            m(x, routing="train")
    finally:
        m.routers.scores, m.run_steps = orig_scores, orig_run
    return seen["sel"], seen["out"]


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_attention_restriction(kv_sharing):
    """mor.md §8.4. Recursion-wise caching: a token selected at recursion r ignores any change
    to unselected tokens' states. KV sharing: it depends on other tokens only through their
    recursion-1 keys and values, never their current states, selected or not."""
    m = mor_model(kv_sharing=kv_sharing)
    x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    r = 1  # the second recursion: capacity 2/3, so some tokens are out
    sel, base = _recursion_outputs(m, x, r, lambda s: torch.zeros_like(s, dtype=torch.float))
    assert not sel.all() and sel.any()
    # perturb every unselected token: selected outputs are bit-identical in both modes
    _, out = _recursion_outputs(m, x, r, lambda s: (~s).float())
    torch.testing.assert_close(out, base, atol=0, rtol=0)
    # perturb every token's current state except that of the last selected token of row 0,
    # which attends to every earlier selected token
    b = 0
    t = int(sel[b].nonzero()[-1])
    last = int(sel[b].sum()) - 1  # its index among the gathered tokens

    def all_but_t(s):
        mask = torch.ones_like(s, dtype=torch.float)
        mask[b, t] = 0
        return mask

    _, out2 = _recursion_outputs(m, x, r, all_but_t)
    change = (out2[b, last] - base[b, last]).abs().max()
    if kv_sharing:  # the others enter only through recursion 1's cached keys and values
        assert change == 0
    else:  # recursion-wise caching attends to the others' current states
        assert change > 1e-4


def _two_documents(eot=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 512, (2, 14), generator=g)
    x[:, 5] = eot  # document 1 = tokens 0..5 (its end-of-text included), document 2 = 6..13
    y = x.clone()
    y[:, :5] = torch.randint(1, 512, (2, 5), generator=g)  # a different first document
    return x, y


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_model(n_layers=4),
        lambda: mor_model(),
        lambda: mor_model(kv_sharing=True),
        lambda: mor_model("token"),
    ],
    ids=["dense", "mor-expert", "mor-kv-sharing", "mor-token"],
)
def test_packing_with_document_masks(make):
    """mor.md §8.10: with document masks, a document's outputs do not depend on the previous
    document (causal routing decides per token, so MoR's depths do not either). Without
    the mask they do (the control)."""
    from earlyexit.training.data import document_segments

    m = make()
    x, y = _two_documents()
    seg = document_segments(x, 0)
    assert seg[0].tolist() == [0] * 6 + [1] * 8
    with torch.no_grad():
        a, b = m(x, segments=seg), m(y, segments=document_segments(y, 0))
        with m.documents(seg):  # the training loop's way: every forward in the block
            c = m(x)
        plain_a, plain_b = m(x), m(y)
    torch.testing.assert_close(b[:, 6:], a[:, 6:], atol=1e-5, rtol=0)
    torch.testing.assert_close(c, a, atol=0, rtol=0)
    assert (plain_b[:, 6:] - plain_a[:, 6:]).abs().max() > 1e-4
    cache = KVCache.for_model(m, 2, 16)
    with pytest.raises(ValueError, match="uncached"):
        m(x, cache=cache, segments=seg)


# ---------------------------------------------------------------------- independent reference
# Every routing variant against tests/reference.py, a per-row, per-recursion loop over the
# explicit token lists written from the paper's equations with its own attention and MLP.
REF_VARIANTS = {
    "expert": ("expert", {}),
    "expert-replace-tanh": ("expert", dict(gating="replace", activation="tanh")),
    "expert-tanh-alpha": ("expert", dict(activation="tanh", alpha=0.3)),
    "expert-mlp-capacities": ("expert", dict(router="mlp", capacities=[1.0, 0.5, 0.25])),
    "expert-aux-router": ("expert", dict(aux_router=True)),
    "expert-kv-sharing": ("expert", dict(kv_sharing=True)),
    "token": ("token", {}),
    "token-bias": ("token", {}),
    "token-kv-sharing": ("token", dict(kv_sharing=True)),
    "token-alpha": ("token", dict(alpha=0.5)),
}


def ref_model(variant):
    kind, kw = REF_VARIANTS[variant]
    m = mor_model(kind, **kw)
    if variant == "token-bias":  # a loss-free balancing bias that changes many choices
        m.routers.bias.copy_(torch.tensor([0.45, -0.3, 0.05]))
    return m


@pytest.mark.parametrize("variant", list(REF_VARIANTS))
@pytest.mark.parametrize("mode", ["causal", "train"])
def test_forward_equals_the_reference(variant, mode):
    """mor.md §8.2: the code-faithful update (H + g F(H)), the gate, top-k and causal
    selection, auxiliary router, loss-free bias and KV sharing against a per-token loop."""
    from tests.reference import mor_reference

    m = ref_model(variant)
    x = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = m(x, routing=mode, return_routing=True)
    metrics = {}
    logits, runs, loss = mor_reference(m, x, mode, metrics=metrics)
    assert set(out.metrics) == set(metrics)
    for k, v in metrics.items():  # router accuracy, dead tokens, depth shares, MaxVio
        assert float(out.metrics[k]) == pytest.approx(v, abs=1e-6), k
    assert torch.equal(out.recursions, runs)
    assert len(set(runs.flatten().tolist())) > 1  # the routers really vary depths
    torch.testing.assert_close(out.logits, logits, atol=2e-5, rtol=0)
    if mode == "train":  # the weighted router losses (aux BCE at 0.001, balancing, z-loss)
        torch.testing.assert_close(out.aux_loss, loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", list(REF_VARIANTS))
def test_padded_uncached_forward_equals_each_row_alone(variant):
    """Right-padded rows (``n_new``) without a cache: the valid tokens' logits are the
    reference's for each row alone (padding is neither attended nor shared)."""
    from tests.reference import mor_reference

    m = ref_model(variant)
    x = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(8))
    lens = [12, 5, 9]
    with torch.no_grad():
        out = m(x, n_new=lens, return_routing=True)
    logits, runs, _ = mor_reference(m, x, "causal", lens)
    for b, n in enumerate(lens):
        assert torch.equal(out.recursions[b, :n], runs[b, :n])
        torch.testing.assert_close(out.logits[b, :n], logits[b, :n], atol=2e-5, rtol=0)


@pytest.mark.parametrize("variant", list(REF_VARIANTS))
def test_batched_generation_equals_the_reference(variant):
    """Greedy batched generation: each token is the reference's argmax given the row's
    prefix, each depth the reference's steps at that position."""
    from tests.reference import mor_reference

    m = ref_model(variant)
    ps = [[5, 6, 7], [9, 3, 8, 1, 4, 4, 2, 7], [1, 2]]
    res = generate(m, ps, SamplingParams(max_new_tokens=6, ignore_eos=True))
    K = sum(s.recursion == 0 for s in m.plan)  # steps per recursion
    for p, r in zip(ps, res):
        seq = torch.tensor([p + r.token_ids])
        logits, runs, _ = mor_reference(m, seq)
        n = len(p)
        assert r.token_ids == logits[0, n - 1 : -1].argmax(-1).tolist()
        assert r.depths == (2 + K * runs[0, n - 1 : -1]).tolist()


def test_generation_computes_only_routed_tokens():
    """Batched generation runs a recursion only on the tokens routed to it (prefill and
    decode, rows of different lengths), and says so: the shared blocks see exactly the
    routed token-recursions, counted independently by wrapping the blocks."""
    from tests.reference import mor_reference

    m = ref_model("expert")
    shared = {s.block for s in m.plan if s.recursion is not None}
    K = sum(s.recursion == 0 for s in m.plan)
    seen = [0]
    for b in shared:
        blk = m.blocks[b]
        orig = blk.forward

        def counted(h, *a, _orig=orig, **k):
            assert h.numel() > 0, "a recursion ran a group without tokens"
            seen[0] += h.shape[0] * h.shape[1]
            return _orig(h, *a, **k)

        blk.forward = counted
    from earlyexit.decoding.mor import RouterDepth

    ps = [[5, 6, 7, 1, 9, 4, 4], [9, 3], [1, 2, 8, 8]]
    s = RouterDepth()
    res = generate(m, ps, SamplingParams(max_new_tokens=7, ignore_eos=True), strategy=s)
    routed = 0
    for p, r in zip(ps, res):  # every token fed to the model: the prompt and all but the last
        _, runs, _ = mor_reference(m, torch.tensor([p + r.token_ids[:-1]]))
        routed += int(runs.sum())
    assert seen[0] == K * routed
    assert s.stats()["token_recursions"] == {"computed": routed, "routed": routed}


def test_router_losses_and_init_edge_cases():
    # one candidate: the BCE is that token's alone (mean over candidates, not over >= 2)
    z = torch.tensor([[1.5, -2.0]])
    one = torch.tensor([[True, False]])
    want = torch.nn.functional.binary_cross_entropy_with_logits(z[0, :1], torch.zeros(1))
    torch.testing.assert_close(expert_aux_loss(z, torch.zeros_like(one), one), want)
    # z-loss over the last dimension of (B, T, N) logits
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z_loss(logits), torch.logsumexp(logits, -1).pow(2).mean())
    # init N(0, 0.02) weights and zero biases (mor.md §1), reproducible from a generator
    cfg = ModelConfig.from_name(
        "tiny", **MOR, d_model=128, router={"kind": "expert", "router": "mlp", "aux_router": True}
    )
    m = Decoder(cfg)
    m.init_weights(torch.Generator().manual_seed(0))  # (make_model perturbs biases)
    named = [(n, p.detach()) for n, p in m.routers.named_parameters()]
    w = torch.cat([p.flatten() for n, p in named if n.endswith("weight")])
    assert abs(float(w.mean())) < 0.002 and abs(float(w.std()) - 0.02) < 0.001
    assert all(not p.any() for n, p in named if n.endswith("bias"))
    again = [p.detach().clone() for p in m.routers.parameters()]
    m.routers.reset_parameters(torch.Generator().manual_seed(1))
    first = [p.clone() for p in m.routers.parameters()]
    m.routers.reset_parameters(torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, m.routers.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("variant", ["expert", "expert-aux-router", "token", "token-bias"])
def test_one_short_row_equals_the_reference(variant):
    """Top-k with floor(c_r T) < 1 (k = 1), a single row (no dead-token ratio), fewer
    tokens than depths (MaxVio's load mean below 1)."""
    from tests.reference import mor_reference

    m = ref_model(variant)
    x = torch.tensor([[17, 301]])
    for mode in ("train", "causal"):
        with torch.no_grad():
            out = m(x, routing=mode, return_routing=True)
        metrics = {}
        logits, runs, loss = mor_reference(m, x, mode, metrics=metrics)
        assert torch.equal(out.recursions, runs) and set(out.metrics) == set(metrics)
        torch.testing.assert_close(out.logits, logits, atol=2e-5, rtol=0)
        if mode == "train":
            torch.testing.assert_close(out.aux_loss, loss, atol=1e-6, rtol=1e-5)
        for k, v in metrics.items():
            assert float(out.metrics[k]) == pytest.approx(v, abs=1e-6), k


def test_a_zero_score_does_not_continue():
    """sigmoid(0) = 0.5 is not > 0.5: with zero router weights nobody continues past the
    capacity-1 recursion, and the training accuracy counts z = 0 as 'not selected'."""
    m = mor_model()
    with torch.no_grad():
        for p in m.routers.parameters():
            p.zero_()
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (m(x, return_routing=True).recursions == 1).all()
        out = m(x, routing="train", return_routing=True)
    for r in (1, 2):  # candidates: tokens that ran r recursions; selected: r + 1
        cand, sel = out.recursions >= r, out.recursions >= r + 1
        want = float((~sel[cand]).float().mean())
        assert float(out.metrics[f"router_accuracy@{r + 1}"]) == pytest.approx(want)


@pytest.mark.parametrize("variant", ["expert", "expert-kv-sharing", "token"])
def test_cached_forward_on_other_cache_rows(variant):
    """Prefill and decode into cache rows [2, 0] of a 3-row cache (the engine's way) equal
    the reference on each row's sequence."""
    from tests.reference import mor_reference

    m = ref_model(variant)
    x = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(m, 3, 12)
    with torch.inference_mode():
        a = m(x[:, :6], cache=cache, rows=[2, 0])
        b = m(x[:, 6:8], cache=cache, rows=[2, 0])
    logits, _, _ = mor_reference(m, x)
    torch.testing.assert_close(torch.cat([a, b], 1), logits, atol=2e-5, rtol=0)
    assert cache.lengths[:, 1].sum() == 0  # row 1 untouched


def test_recursion_ranges_of_three_step_recursions():
    from earlyexit.models.mor import recursion_ranges, step_depth

    m = make_model(
        n_layers=11, sharing={"scheme": "middle_cycle", "loops": 3}, router={"kind": "expert"}
    )
    prefix, recs, suffix = recursion_ranges(m.plan)
    assert (prefix, recs, suffix) == (
        range(0, 1),
        [range(1, 4), range(4, 7), range(7, 10)],
        range(10, 11),
    )
    assert step_depth(m, torch.tensor([0, 1, 3])).tolist() == [2, 5, 11]
