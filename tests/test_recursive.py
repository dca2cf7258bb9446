"""Relaxed Recursive Transformers: recursive.md §7 invariants, conversion, LoRA, uptraining."""

import dataclasses

import numpy as np
import pytest
import torch

from earlyexit.config import LoraConfig, ModelConfig
from earlyexit.errors import ConfigError
from earlyexit.models.kv_cache import KVCache
from earlyexit.models.lora import truncated_svd
from earlyexit.models.recursive import (
    INITS,
    convert_recursive,
    stepwise_indices,
    target_weight,
    unroll,
)
from tests.conftest import make_model

ATOL = 1e-5


def tied_norm_dense(n_layers=8, **kw):
    """A dense model whose norms are equal across layers (the spec's exactness condition)."""
    m = make_model(n_layers=n_layers, **kw)
    with torch.no_grad():
        for blk in m.blocks[1:]:
            blk.attn_norm.weight.copy_(m.blocks[0].attn_norm.weight)
            blk.mlp_norm.weight.copy_(m.blocks[0].mlp_norm.weight)
    return m


def _cached(model, x, first=5):
    cache = KVCache.for_model(model, x.shape[0], x.shape[1])
    with torch.inference_mode():
        out = [model(x[:, :first], cache=cache)]
        out += [model(x[:, t : t + 1], cache=cache) for t in range(first, x.shape[1])]
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("init", INITS)
def test_one_loop_is_the_identity_conversion(init):
    dense = make_model(n_layers=4)
    rec = convert_recursive(dense, loops=1, init=init)
    x = torch.randint(0, 512, (2, 10))
    with torch.inference_mode():
        torch.testing.assert_close(rec(x), dense(x), atol=0, rtol=0)


def test_state_dict_holds_k_blocks_and_stepwise_indices():
    rec = convert_recursive(make_model(n_layers=8), loops=2)
    assert {k.split(".")[1] for k in rec.state_dict() if k.startswith("blocks.")} == {
        "0",
        "1",
        "2",
        "3",
    }
    assert stepwise_indices(0, 17, 9) == [0, 2, 4, 6, 8, 11, 13, 15, 17]
    assert stepwise_indices(0, 5, 3) == [0, 2, 5]
    assert stepwise_indices(0, 21, 11) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21]  # TinyLlama
    assert stepwise_indices(0, 15, 8) == [0, 2, 4, 6, 9, 11, 13, 15]  # Pythia


def test_stepwise_average_and_lower_take_the_right_layers():
    dense = make_model(n_layers=6)
    stepwise = convert_recursive(dense, loops=2, init="stepwise")  # K=3 blocks <- layers 0, 2, 5
    for b, src in enumerate([0, 2, 5]):
        assert torch.equal(stepwise.blocks[b].mlp.w2.weight, dense.blocks[src].mlp.w2.weight)
    lower = convert_recursive(dense, loops=2, init="lower")
    assert torch.equal(lower.blocks[1].attn.wqkv.weight, dense.blocks[1].attn.wqkv.weight)
    avg = convert_recursive(dense, loops=2, init="average")  # block 1 <- mean of layers 1 and 4
    for name in ("attn.wqkv.weight", "mlp_norm.weight"):
        mean = (dense.blocks[1].state_dict()[name] + dense.blocks[4].state_dict()[name]) / 2
        torch.testing.assert_close(avg.blocks[1].state_dict()[name], mean)
    mid = convert_recursive(make_model(n_layers=8), loops=3, scheme="middle_cycle", init="stepwise")
    dense8 = make_model(n_layers=8)
    assert torch.equal(mid.blocks[0].mlp.w2.weight, dense8.blocks[0].mlp.w2.weight)  # unique first
    assert torch.equal(mid.blocks[3].mlp.w2.weight, dense8.blocks[7].mlp.w2.weight)  # unique last
    assert torch.equal(
        mid.blocks[1].mlp.w2.weight, dense8.blocks[1].mlp.w2.weight
    )  # linspace(1, 6, 2)
    assert torch.equal(mid.blocks[2].mlp.w2.weight, dense8.blocks[6].mlp.w2.weight)


@pytest.mark.parametrize(
    "scheme,loops,layers", [("cycle", 2, 8), ("sequence", 2, 6), ("middle_cycle", 3, 8)]
)
def test_full_rank_svd_relaxation_reproduces_the_source(scheme, loops, layers):
    dense = tied_norm_dense(n_layers=layers)
    rec = convert_recursive(dense, loops, scheme, init="average", lora=LoraConfig(rank=10_000))
    x = torch.randint(0, 512, (2, 14))
    with torch.inference_mode():
        ref = dense(x)
        torch.testing.assert_close(rec(x), ref, atol=1e-4, rtol=0)
        cached, cache = _cached(rec, x)
    torch.testing.assert_close(cached, ref, atol=1e-4, rtol=0)
    assert cache.n_slots == layers  # one KV entry per depth


def test_rank_zero_equals_plain_recursive():
    dense = make_model(n_layers=8)
    plain = convert_recursive(dense, 2, init="average")
    relaxed = convert_recursive(dense, 2, init="average", lora=LoraConfig(rank=4), lora_init="zero")
    x = torch.randint(0, 512, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(relaxed(x), plain(x), atol=0, rtol=0)  # B = 0 everywhere
    with torch.no_grad():  # and the svd-initialised model with every B zeroed
        svd = convert_recursive(dense, 2, init="average", lora=LoraConfig(rank=4))
        for b in svd.blocks:
            for t in b.lora.B:
                b.lora.B[t].zero_()
    with torch.inference_mode():
        torch.testing.assert_close(svd(x), plain(x), atol=0, rtol=0)


def test_truncation_error_matches_eckart_young():
    g = torch.Generator().manual_seed(0)
    r_mat = torch.randn(24, 16, generator=g)
    s = torch.linalg.svdvals(r_mat)
    errs = []
    for r in range(0, 17):
        bm, am = truncated_svd(r_mat, r)
        err = (r_mat - bm @ am).pow(2).sum()
        torch.testing.assert_close(err, s[r:].pow(2).sum(), atol=1e-3, rtol=1e-4)
        errs.append(float(err))
    assert all(a >= b - 1e-4 for a, b in zip(errs, errs[1:]))
    bm, am = truncated_svd(torch.zeros(5, 4), 3)
    assert not (bm @ am).any()


def test_whitened_svd_minimises_output_error_over_its_inputs():
    """asvd init: over inputs X (n, d_in) with C = X^T X / n, the rank-r B A minimises
    ||X (R - B A)^T||_F; Eckart-Young on R X^T (the reference, from the SVD of the product
    itself) gives that minimum. Plain SVD does worse on anisotropic inputs; full rank is
    exact with or without damping."""
    from earlyexit.models.lora import whitened_svd

    g = torch.Generator().manual_seed(3)
    r_mat = torch.randn(24, 40, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -3, 40, dtype=torch.float64)  # a few directions carry the inputs
    x = torch.randn(300, 40, generator=g, dtype=torch.float64) * scales
    cov = x.T @ x / len(x)
    for r in (1, 4, 12):
        bm, am = whitened_svd(r_mat, cov, r, damp=0.0)
        assert bm.shape == (24, r) and am.shape == (r, 40) and bm.dtype == torch.float32
        err = (x @ (r_mat - bm.double() @ am.double()).T).pow(2).sum()
        best = torch.linalg.svdvals(r_mat @ x.T)[r:].pow(2).sum()
        torch.testing.assert_close(err, best, rtol=1e-4, atol=1e-6 * float(best))
        pb, pa = truncated_svd(r_mat, r)
        plain = (x @ (r_mat - pb.double() @ pa.double()).T).pow(2).sum()
        assert plain > 1.1 * err
    for damp in (0.0, 1e-2):
        bm, am = whitened_svd(r_mat, cov, 24, damp=damp)
        torch.testing.assert_close(bm.double() @ am.double(), r_mat, atol=1e-4, rtol=0)


def test_drift_corrected_fit_is_the_least_squares_optimum():
    """sequential init, one linear: B A minimises ||W_src X_d - (W' + B A) X_r||_F over
    rank r, given the converted model's inputs X_r and the source's X_d at the same
    positions. Reference: the unconstrained optimum from lstsq, then Eckart-Young on its
    outputs (the rest of the error is orthogonal to X_r's row space)."""
    from earlyexit.models.lora import drift_corrected, whitened_svd

    g = torch.Generator().manual_seed(4)
    d_out, d_in, n = 12, 20, 400
    w_src = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    w_sh = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x_d = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -1, d_in)
    x_r = x_d + 0.3 * torch.randn(n, d_in, generator=g, dtype=torch.float64)  # drifted inputs
    target = x_d @ w_src.T - x_r @ w_sh.T  # (n, d_out): what B A x_r should add
    m_star = torch.linalg.lstsq(x_r, target).solution.T  # (d_out, d_in)
    rest = (target - x_r @ m_star.T).pow(2).sum()
    c_rr, c_dr = x_r.T @ x_r / n, x_d.T @ x_r / n
    delta = drift_corrected(w_src - w_sh, w_src, c_rr, c_dr, damp=0.0)
    torch.testing.assert_close(delta, m_star, atol=1e-8, rtol=1e-8)
    for r in (2, 6):
        bm, am = whitened_svd(delta, c_rr, r, damp=0.0)
        err = (target - x_r @ (bm.double() @ am.double()).T).pow(2).sum()
        best = rest + torch.linalg.svdvals(x_r @ m_star.T)[r:].pow(2).sum()
        torch.testing.assert_close(err, best, rtol=1e-4, atol=0.0)
    # equal inputs: no drift to correct, the plain residual (damping or not)
    same = drift_corrected(w_src - w_sh, w_src, c_rr, c_rr)
    torch.testing.assert_close(same, w_src - w_sh, atol=1e-12, rtol=0)


def _inputs_by_step(model, tokens):
    """{(step, linear path): its input (n, d_in)} over an uncached forward, step by step
    (a shared block's linears are hooked once and see every step that runs it)."""
    cur, seen = {}, {}
    paths = ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")
    hooks = [
        blk.get_submodule(p).register_forward_pre_hook(
            lambda m, a, p=p: seen.__setitem__((cur["i"], p), a[0].reshape(-1, a[0].shape[-1]))
        )
        for blk in model.blocks
        for p in paths
    ]
    with torch.inference_mode():
        ctx = model.context(model.default_positions(tokens.shape, None))
        h = model.embed(tokens)
        for i in range(model.n_steps):
            cur["i"] = i
            h = model.run_step(i, h, ctx)
    for hk in hooks:
        hk.remove()
    return seen


def test_sequential_lora_is_the_least_squares_fit_on_the_converted_models_inputs(monkeypatch):
    """sequential init, whole model: every step's LoRA (rank 3) minimises
    ||X_d W_src^T - X_r (W' + B A)^T|| over the inputs X_r the *finished* converted model
    feeds that linear (earlier LoRAs set) and the source's X_d at the same positions.
    Reference per (step, target): lstsq's unconstrained optimum, then Eckart-Young on its
    outputs. A fit that ignored the drift (X_d = X_r), fitted the linears out of order or
    read the wrong linear's inputs would leave more error."""
    from earlyexit.models import lora as lora_mod
    from earlyexit.models.recursive import TARGET_INPUT

    monkeypatch.setattr(lora_mod, "CALIBRATION_DAMP", 0.0)  # exact least squares
    dense = make_model(n_layers=4)
    calib = torch.randint(0, 512, (12, 16), generator=torch.Generator().manual_seed(8))
    rec = convert_recursive(
        dense,
        2,
        init="average",
        lora=LoraConfig(rank=3, norms=True),
        lora_init="sequential",
        calibration=calib,
    )
    x_dense, x_rec = _inputs_by_step(dense, calib), _inputs_by_step(rec, calib)
    for i, step in enumerate(rec.plan):
        blk = rec.blocks[step.block]
        for t in ("q", "v", "o", "gate", "down"):
            xd, xr = x_dense[i, TARGET_INPUT[t]].double(), x_rec[i, TARGET_INPUT[t]].double()
            w_src = target_weight(dense.blocks[i], t).detach().double()
            w_sh = target_weight(blk, t).detach().double()
            y = xd @ w_src.T - xr @ w_sh.T
            m_star = torch.linalg.lstsq(xr, y).solution.T
            rest = (y - xr @ m_star.T).pow(2).sum()
            best = rest + torch.linalg.svdvals(xr @ m_star.T)[3:].pow(2).sum()
            ba = (blk.lora.B[t][step.lora] @ blk.lora.A[t][step.lora]).detach().double()
            err = (y - xr @ ba.T).pow(2).sum()
            torch.testing.assert_close(
                err, best, rtol=2e-3, atol=1e-6 * float(best), msg=f"step {i}, {t}"
            )


@pytest.mark.parametrize("lora_init", ["asvd", "sequential"])
@pytest.mark.parametrize("scheme,loops,layers", [("cycle", 2, 8), ("middle_cycle", 3, 8)])
def test_full_rank_calibrated_relaxation_reproduces_the_source(lora_init, scheme, loops, layers):
    """asvd and sequential measure inputs on calibration tokens, then are exact at full
    rank like plain SVD (sequential: each step then sees the source's own inputs, so there
    is no drift to correct); without calibration tokens they are refused."""
    dense = tied_norm_dense(n_layers=layers)
    calib = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    full = LoraConfig(rank=10_000, norms=True)
    rec = convert_recursive(
        dense, loops, scheme, init="average", lora=full, lora_init=lora_init, calibration=calib
    )
    x = torch.randint(0, 512, (2, 14))
    with torch.inference_mode():
        torch.testing.assert_close(rec(x), dense(x), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="calibration"):
        convert_recursive(dense, loops, scheme, lora=full, lora_init=lora_init)


def test_asvd_lora_is_the_whitened_truncation_over_each_linears_own_inputs():
    """Each target's LoRA at partial rank is the whitened truncation of its residual over
    the inputs of *its* linear (q/k/v: the fused qkv's, o: the attention output's, ...),
    recorded here with the test's own hooks on the source."""
    from earlyexit.models.lora import whitened_svd

    dense = tied_norm_dense(n_layers=4)
    calib = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    rec = convert_recursive(
        dense, 2, init="average", lora=LoraConfig(rank=3), lora_init="asvd", calibration=calib
    )
    inputs = {}
    mods = {"qkv": "attn.wqkv", "o": "attn.wo", "gu": "mlp.w13", "down": "mlp.w2"}
    hooks = [
        dense.blocks[i]
        .get_submodule(path)
        .register_forward_pre_hook(
            lambda m, a, key=(i, name): inputs.setdefault(key, []).append(
                a[0].reshape(-1, a[0].shape[-1])
            )
        )
        for i in range(4)
        for name, path in mods.items()
    ]
    with torch.inference_mode():
        for row in calib:  # one row at a time: the moments must not depend on batching
            dense(row[None])
    for h in hooks:
        h.remove()
    which = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gu", "up": "gu", "down": "down"}
    for i, step in enumerate(rec.plan):
        blk = rec.blocks[step.block]
        for t in ("q", "o", "up", "down"):
            x = torch.cat(inputs[i, which[t]]).double()
            residual = target_weight(dense.blocks[i], t) - target_weight(blk, t)
            bm, am = whitened_svd(residual, x.T @ x / len(x), 3)
            got = blk.lora.B[t][step.lora] @ blk.lora.A[t][step.lora]
            torch.testing.assert_close(got, bm @ am, atol=1e-4, rtol=1e-3)


def test_input_moments_are_each_linears_input_second_moment():
    """The hooks see what each linear sees: checked against the inputs recomputed by hand
    from the block's own modules (layer 0: embeddings -> attention norm -> wqkv)."""
    from earlyexit.models.recursive import input_moments

    dense = make_model(n_layers=2)
    toks = torch.randint(0, 512, (2, 7))
    m = input_moments(dense, toks, [0, 1], batch_size=1)
    assert set(m) == {(i, p) for i in (0, 1) for p in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2")}
    with torch.inference_mode():
        h = dense.embed(toks)  # layer 0's input: the embeddings
        xn = dense.blocks[0].attn_norm(h).reshape(-1, h.shape[-1]).double()
    torch.testing.assert_close(m[0, "attn.wqkv"], xn.T @ xn / toks.numel(), atol=1e-6, rtol=1e-6)
    down_in = m[1, "mlp.w2"]
    assert down_in.shape == (dense.config.d_ff, dense.config.d_ff)
    assert torch.allclose(down_in, down_in.T) and torch.linalg.eigvalsh(down_in).min() > -1e-9


def test_shared_gradient_is_the_sum_of_untied_gradients():
    rec = convert_recursive(make_model(n_layers=6), 3, init="average", lora=LoraConfig(rank=2))
    rec.train()
    dense = unroll(rec).train()
    x = torch.randint(0, 512, (2, 8))
    rec(x).pow(2).mean().backward()
    dense(x).pow(2).mean().backward()
    for b in range(rec.config.n_blocks):
        steps = [i for i, s in enumerate(rec.plan) if s.block == b]
        total = sum(dense.blocks[i].mlp_norm.weight.grad for i in steps)
        torch.testing.assert_close(rec.blocks[b].mlp_norm.weight.grad, total, atol=1e-5, rtol=1e-4)


def test_unroll_equals_the_relaxed_model():
    rec = convert_recursive(
        make_model(n_layers=8), 2, init="stepwise", lora=LoraConfig(rank=3, down=5)
    )
    dense = unroll(rec)
    assert dense.config.sharing.scheme == "none" and len(dense.blocks) == 8
    x = torch.randint(0, 512, (2, 11))
    with torch.inference_mode():
        torch.testing.assert_close(dense(x), rec(x), atol=ATOL, rtol=0)


def test_gemma_2b_shaped_parameter_counts():
    base = ModelConfig.from_name("gemma-2b-shape")
    assert round(base.param_counts()["non_embedding"] / 1e9, 2) == 1.98
    rec = ModelConfig.from_name("gemma-2b-shape", sharing={"scheme": "cycle", "loops": 2})
    assert round(rec.param_counts()["non_embedding"] / 1e9, 2) == 0.99
    for rank, billions in [(64, 1.07), (128, 1.15), (256, 1.30), (512, 1.60)]:
        cfg = dataclasses.replace(rec, lora=LoraConfig(rank=rank))
        assert round(cfg.param_counts()["non_embedding"] / 1e9, 2) == billions, rank


@pytest.mark.parametrize("slot_list", [[2, 0, 1], [1, 0, 1, 2, 0, 0], [1, 1, 1]])
@pytest.mark.parametrize("relax_norms_biases", [False, True])
def test_per_row_lora_slots_equal_each_row_at_its_own_step(relax_norms_biases, slot_list):
    """Rows at different steps of one shared block in one call (depth-wise batching), each
    with its own LoRA slot (and, relaxed, its own norm and bias offsets); several rows per
    slot, in any order, or all rows at one slot."""
    opts = dict(norms=True, biases=True) if relax_norms_biases else {}
    bias = dict(qkv_bias=True, o_bias=True, mlp_bias=True) if relax_norms_biases else {}
    rec = convert_recursive(
        make_model(n_layers=6, **bias), 3, init="average", lora=LoraConfig(rank=4, **opts)
    )
    with torch.no_grad():  # make every slot's delta (and offset) non-trivial
        for b in rec.blocks:
            for t in b.lora.B:
                b.lora.B[t].normal_(0, 0.05)
            for p in [*(b.lora.norm or {}).values(), *(b.lora.bias or {}).values()]:
                p.normal_(0, 0.05)
    h = torch.randn(len(slot_list), 5, 64)
    ctx = rec.context(rec.default_positions((len(slot_list), 5), None))
    slots = torch.tensor(slot_list)
    with torch.enable_grad():  # training: gradients flow through each slot's rows
        grouped = rec.run_block(1, h, ctx, kv_slot=0, lora_slots=slots)
        grouped.sum().backward()
    assert rec.blocks[1].lora.A["q"].grad is not None
    with torch.inference_mode():
        mixed = rec.run_block(1, h, ctx, kv_slot=0, lora_slots=slots)
        torch.testing.assert_close(grouped.detach(), mixed, atol=ATOL, rtol=0)
        for row, s in enumerate(slots.tolist()):
            c1 = rec.context(rec.default_positions((1, 5), None))
            alone = rec.run_block(1, h[row : row + 1], c1, kv_slot=0, lora_slots=torch.tensor([s]))
            step = next(i for i, st in enumerate(rec.plan) if st.block == 1 and st.lora == s)
            ref = rec.run_step(step, h[row : row + 1], c1)
            torch.testing.assert_close(mixed[row], alone[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(mixed[row], ref[0], atol=ATOL, rtol=0)


def test_loop_exits_read_the_state_after_each_loop():
    rec = convert_recursive(make_model(n_layers=8, exits={"steps": [4]}), 2)
    x = torch.randint(0, 512, (1, 7))
    with torch.inference_mode():
        out = rec(x, exits=True)
        h = rec.hidden_states(x)
        torch.testing.assert_close(out.exit_logits[0], rec.logits(h[3]), atol=0, rtol=0)
        plain = convert_recursive(make_model(n_layers=8), 2)
        assert torch.equal(plain(x), rec(x))  # exits configured or not: same full output


def test_conversion_errors():
    with pytest.raises(ConfigError, match="positive multiple of 3"):
        convert_recursive(make_model(n_layers=8), 3)
    with pytest.raises(ConfigError, match="already shares layers"):
        convert_recursive(convert_recursive(make_model(n_layers=4), 2), 2)
    with pytest.raises(ConfigError, match="needs shared blocks"):
        ModelConfig.from_name("tiny", lora={"rank": 4})
    with pytest.raises(ConfigError, match="lora ranks must be >= 0"):
        ModelConfig.from_name(
            "tiny", n_layers=4, sharing={"scheme": "cycle", "loops": 2}, lora={"rank": -1}
        )
    with pytest.raises(ConfigError, match="unknown init"):
        convert_recursive(make_model(n_layers=4), 2, init="magic")
    with pytest.raises(ConfigError, match="unknown LoRA init"):
        convert_recursive(make_model(n_layers=4), 2, lora_init="magic")


def test_target_weights_are_views_of_the_fused_linears():
    m = make_model()
    blk = m.blocks[0]
    shapes = {
        t: tuple(target_weight(blk, t).shape) for t in ("q", "k", "v", "o", "gate", "up", "down")
    }
    assert shapes == {
        "q": (64, 64),
        "k": (32, 64),
        "v": (32, 64),
        "o": (64, 64),
        "gate": (128, 64),
        "up": (128, 64),
        "down": (64, 128),
    }


def test_cli_convert_merge_and_uptrain(tmp_path, capsys):
    import json

    from earlyexit.cli import main
    from earlyexit.io.checkpoint import load_checkpoint, save_checkpoint
    from earlyexit.tokenizer import Tokenizer
    from earlyexit.training.corpus import prepare
    from earlyexit.training.loop import TrainConfig, train

    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"m{i}.py").write_text(
            "".join(f"def g{i}_{j}(a):\n    return a - {j}\n" for j in range(30))
        )
    prepare([str(src)], tmp_path / "data", vocab_size=300, log=lambda *a: None)
    tok = Tokenizer.from_file(tmp_path / "data" / "tokenizer.json")
    save_checkpoint(make_model(n_layers=4, vocab_size=300), tmp_path / "dense", tok)
    assert (
        main(
            [
                "convert",
                "recursive",
                str(tmp_path / "dense"),
                str(tmp_path / "rec"),
                "--loops",
                "2",
                "--init",
                "average",
                "--lora-ranks",
                "q=4,down=8",
                "--lora-norms",
                "--json",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["non_embedding_params"] < info["source_non_embedding_params"]
    rec, _ = load_checkpoint(tmp_path / "rec")
    assert rec.config.lora.q == 4 and rec.config.lora.down == 8 and rec.config.lora.rank == 0
    # the activation-aware init: calibrated on the prepared corpus, refused without it
    asvd = ["convert", "recursive", str(tmp_path / "dense"), str(tmp_path / "asvd")]
    asvd += ["--loops", "2", "--lora-rank", "4", "--lora-init", "asvd"]
    assert main(asvd) == 1 and "--calibration-data" in capsys.readouterr().err
    assert not (tmp_path / "asvd").exists()
    calib = ["--calibration-data", str(tmp_path / "data"), "--calibration-tokens", "512"]
    assert main([*asvd, *calib]) == 0
    capsys.readouterr()
    a, _ = load_checkpoint(tmp_path / "asvd")
    assert a.blocks[0].lora.B["q"].abs().sum() > 0
    s_dir = [
        "convert",
        "recursive",
        str(tmp_path / "dense"),
        str(tmp_path / "svd2"),
        "--lora-rank",
        "4",
    ]
    assert main([*s_dir, *calib]) == 1 and "asvd or sequential only" in capsys.readouterr().err
    assert rec.config.lora.norms and not rec.config.lora.biases
    assert main(["convert", "merge", str(tmp_path / "rec"), str(tmp_path / "merged")]) == 0
    merged, _ = load_checkpoint(tmp_path / "merged")
    x = torch.randint(0, 300, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(merged(x), rec(x), atol=ATOL, rtol=0)
    assert main(["convert", "merge", str(tmp_path / "dense"), str(tmp_path / "m2")]) == 1
    assert "already dense" in capsys.readouterr().err
    # uptraining with forward-KL distillation from the dense teacher
    cfg = TrainConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "up"),
        init_from=str(tmp_path / "rec"),
        objective="uptrain",
        teacher=str(tmp_path / "dense"),
        distill_weight=0.5,
        seq_len=16,
        batch_size=4,
        steps=3,
        save_every=0,
        eval_every=3,
        eval_batches=1,
        log_every=1,
        device="cpu",
    )
    s = train(cfg, progress=False, log=lambda *a, **k: None)
    rows = [
        json.loads(line) for line in (tmp_path / "up" / "metrics.jsonl").read_text().splitlines()
    ]
    kl_rows = [r for r in rows if "kl" in r]
    assert s["finished"] and kl_rows and all(r["kl"] >= 0 for r in kl_rows)
    assert abs(kl_rows[0]["loss"] - (kl_rows[0]["ce"] + 0.5 * kl_rows[0]["kl"])) < 1e-4
    up, _ = load_checkpoint(s["final"])
    assert up.config.sharing.loops == 2 and up.config.lora.q == 4
    with pytest.raises(ConfigError, match="needs --teacher"):
        train(
            TrainConfig(**{**cfg.__dict__, "teacher": None, "out": str(tmp_path / "up2")}),
            progress=False,
            log=lambda *a, **k: None,
        )


def test_depthwise_mixed_batch_equals_each_row_alone():
    """recursive.md §7.12: a mixed-loop, mixed-request batch, each row with its own LoRA slot
    and KV slot, gives the same hidden states and KV as running each row alone."""
    import copy

    rec = convert_recursive(make_model(n_layers=6), 3, init="average", lora=LoraConfig(rank=4))
    with torch.no_grad():
        for b in rec.blocks:
            for t in b.lora.B:
                b.lora.B[t].normal_(0, 0.05)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 512, (3, 6), generator=g)
    nxt = torch.randint(0, 512, (3, 1), generator=g)
    steps = [1, 3, 5]  # rows at loops 0, 1, 2 of block 1
    assert {rec.plan[s].block for s in steps} == {1}
    cache = KVCache.for_model(rec, 3, 16)
    with torch.inference_mode():
        rec(prompts, cache=cache)
        hs = []
        for b, s in enumerate(steps):  # bring each row to just before its step
            ctx = rec.context(torch.tensor([[6]]), cache, rows=[b])
            hs.append(rec.run_steps(0, s, rec.embed(nxt[b : b + 1]), ctx))
        ref_cache = copy.deepcopy(cache)
        h = torch.cat(hs)  # (3, 1, d)
        ctx = rec.context(
            torch.full((3, 1), 6), cache, kv_slots=[rec.plan[s].kv_slot for s in steps]
        )
        mixed = rec.run_block(1, h, ctx, lora_slots=torch.tensor([rec.plan[s].lora for s in steps]))
        for b, s in enumerate(steps):
            alone = rec.run_step(s, hs[b], rec.context(torch.tensor([[6]]), ref_cache, rows=[b]))
            torch.testing.assert_close(mixed[b], alone[0], atol=ATOL, rtol=0)
        for slot in range(rec.config.n_kv_slots):
            for b in range(3):
                n = ref_cache.lengths[slot, b]
                assert cache.lengths[slot, b] == n
                torch.testing.assert_close(
                    cache.k[slot][b, :, :n], ref_cache.k[slot][b, :, :n], atol=ATOL, rtol=0
                )


@torch.no_grad()
@pytest.mark.parametrize("chunk", ["ragged", "decode"])
@pytest.mark.parametrize("relaxed", ["lora", "lora+norms+biases"])
def test_one_block_call_with_rows_at_different_loops_equals_each_row_alone(relaxed, chunk):
    """Depth-wise batching's block call (rows at loop 1 and loop 2 of one shared block, each
    row with its own KV slot, cache length and LoRA slot) against the obviously correct
    reference: every row run alone through its own step (on PyTorch's attention).
    Contiguous and scattered rows, a ragged catch-up chunk or one token per row, every
    attention path (per-slot views, per-row views, the gather, the decode kernel for one
    token per row, and the automatic choice), and a source with q/k/v/o biases whose
    per-loop norm and bias offsets are relaxed too."""
    import numpy as np

    from earlyexit.config import LoraConfig
    from earlyexit.models.kv_cache import KVCache

    if relaxed == "lora":
        model = convert_recursive(make_model(n_layers=4), 2, lora=LoraConfig(rank=2))
    else:
        src = make_model(n_layers=4, qkv_bias=True, o_bias=True)
        lora = LoraConfig(rank=2, norms=True, biases=True)
        model = convert_recursive(src, 2, lora=lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.normal_(0, 0.05)
    K = model.config.n_blocks
    g = torch.Generator().manual_seed(0)
    lens = np.array([5, 9, 3, 7, 6])  # entries already cached, per row, in both slots
    for rows in (np.array([0, 1, 2, 3, 4]), np.array([4, 0, 3, 1, 2])):
        steps = np.array([0, K, K, 0, K])  # step 0 = block 0 loop 1, step K = loop 2
        n_new = np.array([1, 3, 1, 2, 1])  # row 1 and 3: a multi-token chunk, padded
        if chunk == "decode":
            n_new[:] = 1
        T = int(n_new.max())
        h = torch.randn(5, T, model.config.d_model, generator=g)
        base = KVCache.for_model(model, 5, 16)
        for s in range(model.config.n_kv_slots):
            base.k_all[s].normal_(generator=g)
            base.v_all[s].normal_(generator=g)
        for b, r in enumerate(rows):
            base.lengths[:, r] = lens[b]
        pos = torch.as_tensor(lens)[:, None] + torch.arange(T)[None, :]
        ref = []
        for b, r in enumerate(rows):  # each row alone: the plain path of its own step
            c = _copy_cache(base, "sdpa")
            ctx = model.context(pos[b : b + 1], c, rows=[r], n_new=[n_new[b]])
            ref.append(model.run_step(int(steps[b]), h[b : b + 1], ctx)[0, : n_new[b]])
        modes = ["per-slot", "per-row", "gather", "auto"]
        if T == 1 and base.kernel is not None:
            modes.append("kernel")
        for mode in modes:
            c = _copy_cache(base, mode)
            slots = [model.plan[s].kv_slot for s in steps]
            lora = torch.tensor([model.plan[s].lora for s in steps])
            ctx = model.context(pos, c, rows=rows, n_new=n_new, kv_slots=slots)
            assert mode == "auto" or ctx.backend == mode
            out = model.run_block(0, h, ctx, -1, lora)
            for b in range(5):
                torch.testing.assert_close(out[b, : n_new[b]], ref[b], atol=2e-5, rtol=1e-4)
                assert c.lengths[slots[b], rows[b]] == lens[b] + n_new[b]


def _copy_cache(c, attention="auto"):
    import copy

    new = copy.copy(c)
    new.attention = attention
    new.k_all, new.v_all, new.pos_all = c.k_all.clone(), c.v_all.clone(), c.pos_all.clone()
    new.k, new.v, new.pos = list(new.k_all), list(new.v_all), list(new.pos_all)
    new.lengths = c.lengths.copy()
    return new


def reference_block_of(scheme, L, B):
    """recursive.md §1 / mor.md §1: the shared block each unrolled layer (0-based) runs,
    and whether the layer is a unique first / last one."""
    if scheme == "cycle":
        return [ell % (L // B) for ell in range(L)]
    if scheme == "sequence":
        return [ell // B for ell in range(L)]
    K = (L - 2) // B
    inner = [
        1 + ((ell - 1) % K if scheme == "middle_cycle" else (ell - 1) // B)
        for ell in range(1, L - 1)
    ]
    return [0, *inner, K + 1]


@pytest.mark.parametrize(
    "scheme,L,B",
    [("cycle", 6, 2), ("sequence", 6, 3), ("middle_cycle", 8, 3), ("middle_sequence", 8, 2)],
)
@pytest.mark.parametrize("init", INITS)
def test_every_init_fills_every_block_from_the_right_layers(scheme, L, B, init):
    """recursive.md §1 for B > 1 (B = 1 cannot tell inits apart): every tensor of every
    block, norms included, against the source layers the paper's rule names."""
    # seed 5: a source built from the conversion's own init seed (0) would equal "random"
    dense = make_model(n_layers=L, seed=5)
    rec = convert_recursive(dense, B, scheme, init=init)
    blocks = reference_block_of(scheme, L, B)
    middle = scheme.startswith("middle_")
    shared = sorted({b for b in blocks if blocks.count(b) > 1})
    K = len(shared)
    lo, hi = (1, L - 2) if middle else (0, L - 1)
    for b in range(rec.config.n_blocks):
        tied = [ell for ell in range(L) if blocks[ell] == b]
        if len(tied) == 1:  # a unique first or last layer keeps its own weights
            sources = tied
        elif init == "stepwise":
            sources = [[round(float(x)) for x in np.linspace(lo, hi, K)][shared.index(b)]]
        elif init == "lower":
            sources = [lo + shared.index(b)]
        elif init == "average":
            sources = tied
        else:  # random: no layer of the source
            for name, v in rec.blocks[b].state_dict().items():
                if "norm" not in name:
                    assert all(
                        not torch.equal(v, dense.blocks[ell].state_dict()[name]) for ell in range(L)
                    )
            continue
        for name, v in rec.blocks[b].state_dict().items():
            want = torch.stack([dense.blocks[ell].state_dict()[name] for ell in sources]).mean(0)
            torch.testing.assert_close(v, want, atol=1e-7, rtol=0, msg=f"{init} block {b} {name}")


def qwen2_like(n_layers=8, **kw):
    """Distinct per-layer norms (make_model perturbs them) and, as Qwen2, q/k/v biases."""
    return make_model(n_layers=n_layers, qkv_bias=True, **kw)


RELAX_SOURCES = {
    "distinct-norms": (lambda L: make_model(n_layers=L), dict(norms=True)),
    "qwen2-biases": (lambda L: qwen2_like(L), dict(norms=True, biases=True)),
    "all-biases": (
        lambda L: make_model(n_layers=L, qkv_bias=True, o_bias=True, mlp_bias=True),
        dict(norms=True, biases=True),
    ),
}


@pytest.mark.parametrize("source", list(RELAX_SOURCES))
@pytest.mark.parametrize(
    "scheme,loops,layers", [("cycle", 2, 8), ("sequence", 2, 6), ("middle_cycle", 3, 8)]
)
def test_full_rank_relaxation_with_per_depth_norms_and_biases_is_exact(
    source, scheme, loops, layers
):
    """recursive.md §2's norm caveat, lifted: with per-step norm and bias offsets a full-rank
    SVD relaxation reproduces a source whose layers differ in norms and biases (prefill
    and cached decode). Without them it does not (the control)."""
    make, opts = RELAX_SOURCES[source]
    dense = make(layers)
    x = torch.randint(0, 512, (2, 14))
    full = LoraConfig(rank=10_000, **opts)
    rec = convert_recursive(dense, loops, scheme, init="average", lora=full)
    plain = convert_recursive(dense, loops, scheme, init="average", lora=LoraConfig(rank=10_000))
    with torch.inference_mode():
        ref = dense(x)
        torch.testing.assert_close(rec(x), ref, atol=1e-4, rtol=0)
        assert (plain(x) - ref).abs().max() > 1e-2
        cached, _ = _cached(rec, x)
    torch.testing.assert_close(cached, ref, atol=1e-4, rtol=0)


def test_relaxed_norms_and_biases_unroll_count_and_start_at_zero(tmp_path):
    dense = make_model(n_layers=6, qkv_bias=True, o_bias=True, mlp_bias=True)
    opts = LoraConfig(rank=2, norms=True, biases=True)
    rec = convert_recursive(dense, 2, init="average", lora=opts)
    assert rec.config.lora_params() == sum(
        p.numel() for n, p in rec.named_parameters() if ".lora." in n
    )
    with torch.no_grad():  # non-trivial offsets everywhere
        for b in rec.blocks:
            for p in [*b.lora.norm.values(), *b.lora.bias.values(), *b.lora.B.values()]:
                p.normal_(0, 0.05)
    x = torch.randint(0, 512, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(unroll(rec)(x), rec(x), atol=ATOL, rtol=0)
    from earlyexit.io.checkpoint import load_checkpoint, save_checkpoint

    loaded, _ = load_checkpoint(save_checkpoint(rec, tmp_path / "rec"))
    assert loaded.config.lora.norms and loaded.config.lora.biases
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), rec(x), atol=0, rtol=0)
    # standard init: every offset zero, so the model is the plain recursive one
    zero = convert_recursive(dense, 2, init="average", lora=opts, lora_init="zero")
    plain = convert_recursive(dense, 2, init="average")
    with torch.inference_mode():
        torch.testing.assert_close(zero(x), plain(x), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="has none"):
        ModelConfig.from_name(
            "tiny", n_layers=4, sharing={"scheme": "cycle", "loops": 2}, lora={"biases": True}
        )
