"""Drafts (issue 28): the attention-adapter exit, its KV cache under drafting and rollback,
the stop rule, cached activations, draft files and their fingerprint, resumable training."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from earlyexit.decoding.generate import generate
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.decoding.speculative import SelfSpeculative
from earlyexit.decoding.strategies import ExitWarning, make_strategy
from earlyexit.drafts import SHIPPED, attach, read_draft, save_draft
from earlyexit.errors import CheckpointError, InputError
from earlyexit.models.kv_cache import KVCache
from earlyexit.training import draft as dr
from tests.conftest import make_model
from tests.reference import rms, rope

warnings.filterwarnings("ignore", category=ExitWarning)
GREEDY = SamplingParams(max_new_tokens=14, ignore_eos=True)


def attention_model(dtype=torch.float32, seed=0, n_layers=6):
    m = make_model(
        n_layers=n_layers,
        exits={"steps": [2], "trained": True, "attention": True, "norms": True},
        init_std=0.3,
        seed=seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-trivial adapter (its init zeroes the output projection)
        m.exit_attention[0].attn.wo.weight.normal_(0, 0.3, generator=g)
        m.exit_attention[0].norm.weight.add_(0.1 * torch.randn(m.config.d_model, generator=g))
    return m.to(dtype)


def reference_exit(model, h, pos):
    """The exit's logits (n, V) from its definition, in float64: h + Wo attn(RMSNorm(h)) over
    the exit states ``h`` (n, d) at positions ``pos`` (n,) (causal, GQA, RoPE), then the
    exit's own norm and the tied head."""
    cfg, ea = model.config, model.exit_attention[0]
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = h.double()
    W = ea.attn.wqkv.weight.double()
    xn = rms(h, ea.norm.weight.double(), cfg.norm_eps)
    n = h.shape[0]
    q = rope((xn @ W[: H * D].T).view(n, H, D), pos, cfg.rope_theta)
    k = rope((xn @ W[H * D : (H + Hkv) * D].T).view(n, Hkv, D), pos, cfg.rope_theta)
    v = (xn @ W[(H + Hkv) * D :].T).view(n, Hkv, D)
    out = torch.zeros(n, H, D, dtype=torch.float64)
    for i in range(n):
        seen = pos <= pos[i]
        for hh in range(H):
            g = hh // (H // Hkv)
            out[i, hh] = ((k[seen, g] @ q[i, hh]) / math.sqrt(D)).softmax(0) @ v[seen, g]
    a = h + out.reshape(n, H * D) @ ea.attn.wo.weight.double().T
    hn = rms(a, model.exit_norms[0].weight.double(), cfg.norm_eps)
    return hn @ model.head_weight().double().T


@torch.inference_mode()
def test_attention_exit_matches_its_definition_across_draft_rounds_and_rollbacks():
    """Cached, incremental calls with rollbacks (as speculation makes them) give the logits
    of the attention exit written out over the surviving sequence."""
    m = attention_model()
    d, slot = m.config.d_model, m.config.exit_kv_slot(0)
    cache = KVCache.for_model(m, 1, 64)
    g = torch.Generator().manual_seed(3)
    seq = torch.zeros(0, d)  # the exit states of the entries that survive
    for n, drop in [(5, 0), (1, 0), (3, 2), (4, 3), (1, 0), (2, 1)]:
        h = torch.randn(1, n, d, generator=g)
        start = int(cache.lengths[slot, 0])
        assert start == len(seq)
        ctx = m.context(torch.arange(start, start + n)[None], cache)
        got = m.exit_logits(h, 2, ctx=ctx)[0]  # (n, V)
        ref = reference_exit(m, torch.cat([seq, h[0]]), torch.arange(start + n))
        torch.testing.assert_close(got.double(), ref[-n:], rtol=1e-4, atol=1e-4)
        seq = torch.cat([seq, h[0, : n - drop]])
        cache.lengths[:, 0] -= drop  # reject the last `drop` entries, as a rollback does


def test_exit_with_attention_adapter_needs_its_context():
    m = attention_model()
    with pytest.raises(ValueError, match="forward context"):
        m.exit_logits(torch.randn(2, m.config.d_model), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,stop", [(1, 0.0), (3, 0.0), (4, 0.05), (5, 0.2), (3, 0.99)])
def test_speculation_with_the_attention_exit_and_stop_rule_equals_full_greedy(dtype, k, stop):
    m = attention_model(dtype)
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in (3, 9, 5)]
    full = [r.token_ids for r in generate(m, ps, GREEDY)]
    s = SelfSpeculative(2, k, stop=stop)
    assert [r.token_ids for r in generate(m, ps, GREEDY, strategy=s)] == full
    st = s.stats()
    assert sum(st["draft_lengths"]) == st["calls"] and len(st["draft_lengths"]) == k + 1
    assert st["drafted"] == sum(i * c for i, c in enumerate(st["draft_lengths"]))
    if stop == 0.0:  # no stop rule: every round drafts k
        assert st["draft_lengths"][k] == st["calls"]


def test_stop_rule_stops_at_the_first_unconfident_draft(monkeypatch):
    """A row proposes exactly the drafts before the first one under the threshold."""
    m = attention_model()
    probs = iter([0.9, 0.8, 0.1, 0.95])
    s = SelfSpeculative(2, 4, stop=0.5)
    from earlyexit.decoding import speculative

    real = speculative.propose

    def fake(model, hn, head):
        tok, _ = real(model, hn, head)
        return tok, torch.full_like(tok, next(probs), dtype=torch.float)

    monkeypatch.setattr(speculative, "propose", fake)
    cache = KVCache.for_model(m, 1, 64)
    with torch.inference_mode():
        s.prefill(m, cache, torch.tensor([[1, 2, 3]]), np.array([3]))
        s.decode(m, cache, torch.tensor([4]))
    assert s.stats()["draft_lengths"] == [0, 0, 1, 0, 0]  # two drafts, stopped at the third


def test_draft_options_are_validated_and_attention_exits_serve_only_speculation():
    m = attention_model()
    with pytest.raises(InputError, match="draft_stop"):
        make_strategy(m, "speculative", draft_stop=1.0)
    for name in ("free", "static"):
        with pytest.raises(InputError, match="attention adapter"):
            make_strategy(m, name, exit_step=2)


def test_cached_activations_equal_recomputed_ones(tmp_path):
    m = make_model(n_layers=4)
    windows = np.random.default_rng(0).integers(0, 512, size=(5, 12))
    cache = dr.cache_activations(
        m, windows, (1, 3), tmp_path / "c", topk=7, batch_size=2, show=False
    )
    again = dr.ActivationCache.open(tmp_path / "c")
    assert np.array_equal(again.tokens, windows)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directory left
    with torch.inference_mode():
        hs = m.hidden_states(torch.as_tensor(windows))
        p = torch.softmax(m.logits(hs[-1]), -1)
    for s in (1, 3):
        torch.testing.assert_close(
            torch.from_numpy(np.array(cache.hidden[s])), hs[s - 1], rtol=1e-5, atol=1e-5
        )
    top_p, top_i = p.topk(7, dim=-1)
    assert torch.equal(torch.from_numpy(np.array(cache.top_ids)).long(), top_i)
    torch.testing.assert_close(
        torch.from_numpy(np.array(cache.top_p)).float(), top_p, atol=1e-3, rtol=1e-3
    )


def test_the_draft_starts_from_the_next_blocks_attention_and_trains_only_the_exit():
    m = make_model(n_layers=4)
    dm = dr.draft_model(m, 2)
    assert torch.equal(dm.exit_attention[0].attn.wqkv.weight, m.blocks[2].attn.wqkv.weight)
    assert torch.equal(dm.exit_norms[0].weight, m.norm.weight)
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("exit_attention.", "exit_norms.")) for n in trainable)


def _train(m, cache, tmp, steps, **kw):
    cfg = dr.DraftTrainConfig(
        exit_step=2, steps=steps, batch_size=2, eval_every=2, save_every=2, lr=3e-3, warmup=2
    )
    ids = torch.arange(0, 512, 2)
    rows = np.arange(6)
    return dr.train_draft(
        m, cache, cfg, ids, rows, {"held": np.arange(6, 8)}, tmp, show=False, **kw
    )


def test_draft_training_learns_and_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    m = make_model(n_layers=4, init_std=0.3)
    windows = np.random.default_rng(0).integers(0, 512, size=(8, 16))
    cache = dr.cache_activations(m, windows, (2,), tmp_path / "c", topk=8, show=False)
    straight, rows = _train(m, cache, tmp_path / "a", 6)
    first, last = rows[0], rows[-1]
    assert last["loss"] < first["loss"]  # it learns
    # killed after step 5's optimizer step (its checkpoint is at step 4), then rerun
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        _train(m, cache, tmp_path / "b", 6)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed, _ = _train(m, cache, tmp_path / "b", 6)
    for k, v in dr.draft_parameters(straight).items():
        assert torch.equal(v, dr.draft_parameters(resumed)[k]), k
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6]


def test_a_draft_round_trips_and_is_refused_by_another_model(tmp_path):
    m = attention_model()
    base = make_model(n_layers=6, init_std=0.3)  # the same body without exits
    dm = dr.draft_model(base, 2)
    with torch.no_grad():
        for (_k, v), (_, w) in zip(dr.draft_parameters(dm).items(), dr.draft_parameters(m).items()):
            v.copy_(w)
    vocab = torch.tensor([5, 9, 100])
    save_draft(dm, tmp_path / "d", vocab, k=3, stop=0.25, record={"note": "test"})
    got = attach(base, tmp_path / "d")
    assert got.draft.exit_step == 2 and got.draft.k == 3 and got.draft.stop == 0.25
    assert torch.equal(got.draft.vocab, vocab)
    for k, v in dr.draft_parameters(got).items():
        assert torch.equal(v, dr.draft_parameters(dm)[k])
    s = make_strategy(got, "speculative")  # the draft's defaults
    assert (s.ls, s.k, s.stop) == (2, 3, 0.25) and torch.equal(s.draft_tokens, vocab)
    ps = [[1, 2, 3], [7, 8]]
    assert [r.token_ids for r in generate(got, ps, GREEDY, strategy=s)] == [
        r.token_ids for r in generate(base, ps, GREEDY)
    ]
    other = make_model(n_layers=6, init_std=0.3, seed=5)  # same shape, other weights
    with pytest.raises(CheckpointError, match="weights_sha256"):
        attach(other, tmp_path / "d")
    wider = make_model(n_layers=6, d_model=96)
    with pytest.raises(CheckpointError, match="d_model"):
        attach(wider, tmp_path / "d")
    with pytest.raises(CheckpointError, match="not a draft directory"):
        attach(base, tmp_path)


def test_the_shipped_smollm2_draft_loads_and_drafts_for_its_shape(monkeypatch):
    """Without the SmolLM2 file: the shipped draft's tensors fit a model of SmolLM2's shape
    (random weights, so the fingerprint's weight hash is set to the draft's), and
    speculation through it equals full greedy."""
    path = SHIPPED / "smollm2"
    if not (path / "draft.json").is_file():
        pytest.skip("no shipped SmolLM2 draft in this checkout")
    meta, tensors = read_draft(path)
    from earlyexit.config import ModelConfig
    from earlyexit.models.decoder import Decoder

    cfg = ModelConfig.from_name("smollm2-135m", n_layers=meta["exit_step"] + 2)
    torch.manual_seed(0)
    m = Decoder(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    m.eval()
    real = dr.model_fingerprint
    monkeypatch.setattr(
        dr,
        "model_fingerprint",
        lambda model: {
            **real(model),
            "n_layers": meta["model"]["n_layers"],
            "weights_sha256": meta["model"]["weights_sha256"],
        },
    )
    got = attach(m, path)
    assert got.draft.exit_step == meta["exit_step"] and len(got.draft.vocab) == len(meta["vocab"])
    assert set(tensors) == set(dr.draft_parameters(got))
    ps = [[1, 2, 3, 4]]
    p = SamplingParams(max_new_tokens=6, ignore_eos=True)
    spec = make_strategy(got, "speculative")
    assert [r.token_ids for r in generate(got, ps, p, strategy=spec)] == [
        r.token_ids for r in generate(m, ps, p)
    ]
    assert meta["record"]["data"] and meta["record"]["held_out"]  # what it was trained on


@pytest.mark.parametrize("stop", [0.0, 0.1])
def test_speculation_keeps_the_adapters_kv_exactly_that_of_the_emitted_sequence(stop):
    """Losslessness cannot see a stale or misaligned adapter cache (drafts only get worse),
    so check the cache itself: after several rounds with rollbacks, the adapter slot holds
    the keys of exactly the tokens fed so far, as an uncached forward computes them."""
    m = attention_model()
    cfg, slot = m.config, m.config.exit_kv_slot(0)
    s = SelfSpeculative(2, 3, stop=stop)
    cache = KVCache.for_model(m, 1, 96)
    seq = [5, 17, 3, 99]
    with torch.inference_mode():
        out = s.prefill(m, cache, torch.tensor([seq]), np.array([4]))
        nxt = int(out.logits.argmax(-1))
        for _ in range(8):
            toks = s.decode(m, cache, torch.tensor([nxt])).tokens[0]
            seq += [nxt, *toks[:-1]]
            nxt = toks[-1]
        assert s.stats()["accepted"] < s.stats()["drafted"]  # rollbacks happened
        n = len(seq)
        assert (cache.lengths[:, 0] == n).all()
        h2 = m.hidden_states(torch.tensor([seq]))[1][0]  # (n, d) after 2 steps
        ea = m.exit_attention[0]
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        xn = rms(h2.double(), ea.norm.weight.double(), cfg.norm_eps)
        k = xn @ ea.attn.wqkv.weight.double()[H * D : (H + Hkv) * D].T
        k = rope(k.view(n, Hkv, D), torch.arange(n), cfg.rope_theta)  # (n, Hkv, D)
    got = cache.k[slot][0, :, :n].transpose(0, 1).double()  # (n, Hkv, D)
    torch.testing.assert_close(got, k, rtol=1e-4, atol=1e-4)


def p_full(n):
    return {"accepted": [0.7 * n / 10] * 10, "total": [n / 10] * 10}


def test_adaptive_stop_calibrates_from_verifications_and_stays_lossless():
    from earlyexit.decoding.speculative import AdaptiveStop

    r = AdaptiveStop(cost=0.3, bins=4)
    r.observe([0.9, 0.9, 0.9, 0.1, 0.1, 0.6], [True, True, False, False, False, True])
    # Beta(1,1) posterior means per bin: [1/4, 1/2 (empty), 2/3 (0.6: 1 of 1), 3/5]
    # made non-decreasing: [0.25, 0.5, 0.667, 0.667]
    np.testing.assert_allclose(r.table(), [0.25, 0.5, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r.acceptance([0.05, 0.3, 0.99]), [0.25, 0.5, 2 / 3])
    with pytest.raises(ValueError):
        AdaptiveStop(cost=1.5)
    # a calibration carried over as a prior: each bin capped at `cap` samples, same rates
    p = r.prior(cap=2)
    np.testing.assert_allclose(p["total"], [2, 0, 1, 2])
    np.testing.assert_allclose(p["accepted"], [0, 0, 1, 4 / 3], atol=1e-3)
    r2 = AdaptiveStop(cost=0.3, bins=4, prior=p)
    np.testing.assert_allclose(r2.table(), [0.25, 0.5, 2 / 3, 2 / 3], atol=1e-3)  # 7/12 < 2/3
    with pytest.raises(ValueError, match="prior"):
        AdaptiveStop(cost=0.3, bins=4, prior={"accepted": [2, 0, 0, 0], "total": [1, 0, 0, 0]})
    m = attention_model()
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in (4, 8)]
    s = make_strategy(m, "speculative", draft_k=4, draft_stop="adaptive")
    assert [r.token_ids for r in generate(m, ps, GREEDY, strategy=s)] == [
        r.token_ids for r in generate(m, ps, GREEDY)
    ]
    st = s.stats()
    assert st["stop"] == "adaptive" and st["stop_rule"]["samples"] > 0
    # observations stop at each row's first rejection: no more than drafted, at least calls
    # that drafted anything
    assert st["stop_rule"]["samples"] <= st["drafted"]
    # a draft's calibration is where the rule starts
    s2 = SelfSpeculative(2, 4, stop="adaptive", stop_prior=p_full(10))
    s2.begin(m, None, 1, 8)
    assert s2.rule.total.sum() == 10 and s2.rule.accepted.sum() == 7


def test_train_draft_end_to_end_then_generate_with_it(tmp_path, capsys):
    """The command a user runs: self-distil chat answers, cache, train, save; then
    ``generate --draft`` decodes exactly the full model's greedy tokens, and a draft for
    another model is refused with one error line."""
    from earlyexit.cli import main
    from earlyexit.io.checkpoint import save_checkpoint
    from earlyexit.tokenizer import EOT, byte_level_tokenizer

    tok = byte_level_tokenizer()
    m = make_model(
        vocab_size=tok.vocab_size,
        n_layers=4,
        eos_token_ids=[tok.token_to_id(EOT)],
        init_std=0.3,
        max_context=1024,
    )
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    cfg = json.dumps({"chat_template": template, "eos_token": EOT})
    save_checkpoint(m, tmp_path / "ckpt", tok, extra_files={"tokenizer_config.json": cfg})
    (tmp_path / "tok.json").write_text((tmp_path / "ckpt" / "tokenizer.json").read_text())
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 20)
    assert main(["prepare", "--corpus", str(corpus), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "data"), "--val-fraction", "0.3"]) == 0  # fmt: skip
    args = ["train-draft", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), "--exit-steps", "2", "--chat-prompts", "6",
            "--held-out-prompts", "2", "--answer-tokens", "6", "--code-windows", "4",
            "--held-out-code-windows", "2", "--seq-len", "16", "--steps", "4", "--batch-size", "2",
            "--eval-every", "2", "--draft-vocab", "64", "--k", "3", "--quiet"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= summary["2"]["chat_agreement"] <= 1
    meta, _ = read_draft(tmp_path / "run" / "draft2")
    assert meta["k"] == 3 and meta["stop"] == "adaptive" and len(meta["vocab"]) == 64
    assert sum(meta["stop_prior"]["total"]) > 0  # calibrated on training prompts
    attached = attach(
        make_model(
            vocab_size=tok.vocab_size,
            n_layers=4,
            eos_token_ids=[tok.token_to_id(EOT)],
            init_std=0.3,
            max_context=1024,
        ),
        tmp_path / "run" / "draft2",
    )
    s = make_strategy(attached, "speculative")
    assert s.stop == 0.0 and s.adaptive and s.stop_prior == meta["stop_prior"]  # starts from it
    gen = ["generate", "--model", str(tmp_path / "ckpt"), "--ids", "5 6 7 8", "--max-new-tokens",
           "12", "--ignore-eos", "--json"]  # fmt: skip
    assert main(gen) == 0
    full = json.loads(capsys.readouterr().out)["token_ids"]
    assert (
        main([*gen, "--strategy", "speculative", "--draft", str(tmp_path / "run" / "draft2")]) == 0
    )
    assert json.loads(capsys.readouterr().out)["token_ids"] == full
    other = make_model(vocab_size=tok.vocab_size, n_layers=4, seed=9)
    save_checkpoint(other, tmp_path / "other", tok)
    code = main(["generate", "--model", str(tmp_path / "other"), "--ids", "5 6", "--strategy",
                 "speculative", "--draft", str(tmp_path / "run" / "draft2")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "trained for another model" in err and err.count("\n") == 1


def test_a_shipped_draft_that_does_not_fit_is_skipped_with_a_warning(tmp_path, monkeypatch):
    """``load("smollm2")`` attaches the shipped draft; if this copy of the model is not the
    one it was trained for, loading still works (without the draft) and says why."""
    import earlyexit
    import earlyexit.api as api
    import earlyexit.drafts as drafts

    base = make_model(n_layers=6, init_std=0.3)
    save_draft(dr.draft_model(base, 2), tmp_path / "d", torch.tensor([1, 2]), 3, 0.0, {})
    other = make_model(n_layers=6, init_std=0.3, seed=7)
    monkeypatch.setattr(api, "_load", lambda path, device, dtype: earlyexit.LM(other))
    monkeypatch.setattr(drafts, "shipped_draft", lambda name: tmp_path / "d")
    with pytest.warns(UserWarning, match="shipped draft was not attached"):
        lm = earlyexit.load("smollm2")
    assert lm.model is other and lm.model.draft is None
    with pytest.raises(CheckpointError, match="another model"):  # asked for by path: an error
        earlyexit.load("smollm2", draft=tmp_path / "d")
