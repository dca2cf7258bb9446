"""Which kernel computes a CPU linear (``models/linear_choice.py``, ``models/kernels.py``):
routed by the chosen table, measured once per machine and dtype, never reused from another
CPU or torch, inexact candidates excluded, and every candidate decoding the same greedy
tokens as the plain reference."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from earlyexit.models import kernels, linear_choice
from tests.conftest import make_model

F32 = torch.float32


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    kernels.reset()
    yield
    kernels.reset()


def _fake(fast: dict[int, str]) -> dict:
    """Seconds per bucket where ``fast[bucket]`` is fastest (1.0) and the rest 2.0."""
    return {
        str(b): {c: (1.0 if fast.get(b, "onednn") == c else 2.0) for c in ("onednn", "mkl")}
        for b in linear_choice.BUCKETS
    }


def test_linear_routes_each_row_count_to_its_chosen_kernel(monkeypatch):
    calls = []

    def recorder(name):
        return lambda x, w, b: calls.append(name) or F.linear(x, w, b)

    monkeypatch.setattr(
        kernels, "_FUNCTIONS", {n: recorder(n) for n in ("skinny", "onednn", "mkl")}
    )
    choice = linear_choice.Choice(
        F32, ("skinny", "skinny", "mkl", "mkl", "onednn", "onednn", "mkl"), "test"
    )
    kernels._install(choice)
    w = torch.randn(8, 16)
    with torch.inference_mode():
        for rows, want in ((1, "skinny"), (2, "skinny"), (3, "mkl"), (5, "onednn"), (16, "onednn"),
                           (17, "mkl"), (200, "mkl")):  # fmt: skip
            calls.clear()
            y = kernels.linear(torch.randn(rows, 16), w)
            assert calls == [want] and y.shape == (rows, 8), rows
        calls.clear()
        kernels.linear(torch.randn(1, 3, 16), w)  # leading dims: 3 rows
        assert calls == ["mkl"]
        calls.clear()
        kernels.linear(torch.randn(2, 16).double(), w.double())  # no choice for float64
        assert calls == []
    x = torch.randn(2, 16, requires_grad=True)
    kernels.linear(x, w).sum().backward()  # autograd never goes through a chosen kernel
    assert calls == [] and x.grad is not None


def test_the_fastest_wins_and_the_batch_invariant_kernel_gets_its_margin():
    seconds = {str(b): {"skinny": 1.04, "onednn": 1.0, "mkl": 0.9} for b in (1, 2, 3, 4)}
    seconds["1"]["skinny"] = 0.93  # within 5% of mkl's 0.9: the invariant kernel is kept
    seconds["2"]["skinny"] = 0.96  # 6.7% slower than mkl: not kept
    for b in (8, 16, 64):
        seconds[str(b)] = {"onednn": 1.0, "mkl": 1.1 if b < 64 else 0.5}
    assert linear_choice._pick(seconds) == (
        "skinny", "mkl", "mkl", "mkl", "onednn", "onednn", "mkl"
    )  # fmt: skip


def test_the_choice_is_measured_once_and_never_reused_across_machines(monkeypatch, tmp_path):
    monkeypatch.setenv("EARLYEXIT_LINEAR", "auto")
    shapes = [(96, 64), (64, 96)]
    measured = []

    def fake_measure(dtype, shp):
        measured.append((dtype, tuple(shp)))
        return _fake({1: "mkl", 64: "mkl"}), {}

    monkeypatch.setattr(linear_choice, "measure", fake_measure)
    c = linear_choice.choose(F32, shapes)
    assert c.how == "measured" and c.for_rows(1) == "mkl" and c.for_rows(2) == "onednn"
    assert c.for_rows(17) == "mkl" and measured == [(F32, tuple(sorted(shapes)))]
    (f,) = (tmp_path / "kernels").glob("linear-choice-*.json")
    assert json.loads(f.read_text())["kernels"][0] == "mkl"
    again = linear_choice.choose(F32, shapes)  # read back, not measured
    assert again.how == "cached" and again.kernels == c.kernels and len(measured) == 1
    linear_choice.choose(torch.bfloat16, shapes)  # another dtype is its own choice
    linear_choice.choose(F32, [(32, 64)])  # and other shapes
    assert len(measured) == 3
    # another CPU (its flags) or torch version: a different key, measured anew
    monkeypatch.setattr(linear_choice.decode_kernel, "_cpu_identity", lambda: "flags : other")
    linear_choice.choose(F32, shapes)
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    linear_choice.choose(F32, shapes)
    assert len(measured) == 5
    # a file copied over from another machine under this machine's name is not trusted
    ident = linear_choice._identity(F32, tuple(sorted(shapes)))
    path = linear_choice._cache_path(ident)
    data = json.loads(path.read_text())
    data["identity"]["cpu"] = "flags : copied"
    data["kernels"] = ["skinny"] * len(linear_choice.BUCKETS)
    path.write_text(json.dumps(data))
    assert linear_choice.choose(F32, shapes).how == "measured" and len(measured) == 6
    path.write_text("{ half a file")  # and a corrupt one is measured again, not an error
    assert linear_choice.choose(F32, shapes).how == "measured" and len(measured) == 7


def test_fixed_and_forced_modes_measure_nothing(monkeypatch):
    monkeypatch.setattr(linear_choice, "measure", lambda *a: pytest.fail("measured"))
    for mode in ("fixed", "mkl", "onednn"):
        monkeypatch.setenv("EARLYEXIT_LINEAR", mode)
        c = linear_choice.choose(F32, [(8, 8)])
        if mode != "fixed":
            assert set(c.kernels) == {mode}
    monkeypatch.setenv("EARLYEXIT_LINEAR", "fastest")
    with pytest.raises(ValueError, match="EARLYEXIT_LINEAR"):
        linear_choice.choose(F32, [(8, 8)])


def test_measurement_times_every_candidate_and_excludes_an_inexact_one(monkeypatch):
    """A real (small) measurement: every applicable kernel timed per bucket; a kernel whose
    result strays from float64 is never chosen, however fast."""
    monkeypatch.setattr(linear_choice, "MIN_BYTES", 64 * 1024)
    monkeypatch.setattr(linear_choice, "REPEATS", 2)
    wrong = {**linear_choice.FUNCTIONS, "mkl": lambda x, w, b: F.linear(x, w, b) * 1.01}
    monkeypatch.setattr(linear_choice, "FUNCTIONS", wrong)
    seconds, excluded = linear_choice.measure(F32, [(48, 32)])
    assert set(seconds) == {str(b) for b in linear_choice.BUCKETS}
    assert "mkl" in excluded and all("mkl" not in t for t in seconds.values())
    assert "mkl" not in linear_choice._pick(seconds)
    if linear_choice.onednn_available():
        assert all("onednn" in t for t in seconds.values())
    seconds, excluded = linear_choice.measure(torch.bfloat16, [(48, 32)])
    assert "skinny" not in seconds["1"]  # the compiled kernel is fp32 only


def test_a_forward_never_measures_a_decode_cache_chooses_with_the_models_shapes(monkeypatch):
    """Nothing compiles or measures inside a forward; creating a CPU decode cache chooses
    the kernels once per dtype, from the model's own linear shapes (the head included)."""
    from earlyexit.models.kv_cache import KVCache

    monkeypatch.setenv("EARLYEXIT_LINEAR", "auto")
    seen = []
    monkeypatch.setattr(
        linear_choice, "measure", lambda dt, shp: seen.append(tuple(shp)) or (_fake({}), {})
    )
    model = make_model(n_layers=2)
    x = torch.randn(2, 1, model.config.d_model)
    with torch.inference_mode():
        model.blocks[0].mlp.w13(x)
    assert not seen and kernels.choice(F32) is None
    KVCache.for_model(model, 1, 8)
    KVCache.for_model(model, 2, 8)  # decided already in this process
    cfg = model.config
    assert len(seen) == 1 and (cfg.vocab_size, cfg.d_model) in seen[0]
    assert (2 * cfg.d_ff, cfg.d_model) in seen[0]
    assert "onednn" in kernels.status() and "measured" in kernels.status()


@pytest.mark.parametrize("kernel", ["skinny", "onednn", "mkl"])
def test_every_kernel_decodes_the_reference_greedy_tokens(kernel, monkeypatch):
    """Greedy tokens at batch 1 (fp32) with each kernel forced equal those of plain
    ``F.linear`` through a model built without our linear at all."""
    from earlyexit.decoding.generate import generate
    from earlyexit.decoding.sampling import SamplingParams

    if kernel == "skinny" and linear_choice.skinny.load() is None:
        pytest.skip("no C compiler here")
    if kernel == "onednn" and not linear_choice.onednn_available():
        pytest.skip("no oneDNN in this torch")
    model = make_model(n_layers=4)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = [[5, 17, 3, 9, 11]]
    with kernels.forced("mkl"):  # the reference: F.linear everywhere
        ref = generate(model, prompt, params)[0].token_ids
    monkeypatch.setenv("EARLYEXIT_LINEAR", kernel)
    kernels.reset()
    out = generate(model, prompt, params)[0].token_ids
    assert kernels.choice(F32).for_rows(1) == kernel
    assert out == ref


def test_a_cached_choice_loads_the_compiled_kernel_or_falls_back(monkeypatch):
    """A choice read from the cache in a fresh process names the compiled kernel before
    anything built or loaded it: installing it loads it (or, without it, takes oneDNN)."""
    from earlyexit.models import skinny

    cached = linear_choice.Choice(F32, ("skinny",) * len(linear_choice.BUCKETS), "cached")
    x, w = torch.randn(1, 40), torch.randn(24, 40)
    if skinny.load() is not None:
        monkeypatch.setattr(skinny, "_fn", None)
        monkeypatch.setattr(skinny, "_state", "not loaded")  # as in a new process
        kernels._install(cached)
        with torch.inference_mode():
            torch.testing.assert_close(kernels.linear(x, w), x @ w.T)
        assert kernels.choice(F32).for_rows(1) == "skinny"
    monkeypatch.setattr(skinny, "load", lambda: None)  # no compiler on this machine now
    kernels._install(cached)
    assert "skinny" not in kernels.choice(F32).kernels
    with torch.inference_mode():
        torch.testing.assert_close(kernels.linear(x, w), x @ w.T)
