"""The compiled few-row linear (``models/skinny.py``): exact against float64, a row's result
independent of the rows beside it, and the choice of where it runs."""

import json

import pytest
import torch

from earlyexit.models import kernels, skinny

pytestmark = pytest.mark.skipif(skinny.load() is None, reason="no C compiler here")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("k", [576, 37, 16])
def test_matches_float64_and_is_batch_invariant(rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(200, k, generator=g)
    b = torch.randn(200, generator=g)
    with torch.inference_mode():
        y = skinny.skinny_linear(x, w, b)
        ref = (x.double() @ w.double().T + b.double()).float()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
        for r in range(rows):  # each row alone gives the same bits as inside the chunk
            assert torch.equal(skinny.skinny_linear(x[r : r + 1], w, b)[0], y[r])
        y3 = skinny.skinny_linear(x.view(1, rows, k), w)  # leading dims, no bias
        torch.testing.assert_close(y3[0], (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-4)


def test_strided_rows_are_read_through_their_stride():
    x = torch.randn(3, 2, 64)[:, 0]  # rows 128 floats apart
    w = torch.randn(10, 64)
    with torch.inference_mode():
        torch.testing.assert_close(skinny.skinny_linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


def test_linear_routes_few_rows_by_the_measured_choice(monkeypatch):
    calls = []
    real = skinny.skinny_linear
    monkeypatch.setattr(skinny, "skinny_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(skinny, "_rows", frozenset({1, 2}))
    w = torch.randn(8, 16)
    with torch.inference_mode():
        kernels.linear(torch.randn(1, 2, 16), w)  # 2 rows: chosen
        kernels.linear(torch.randn(3, 16), w)  # 3 rows: not chosen
        kernels.linear(torch.randn(1, 16).double(), w.double())  # not fp32
    assert len(calls) == 1
    x = torch.randn(2, 16, requires_grad=True)
    kernels.linear(x, w).sum().backward()  # autograd never goes through the kernel
    assert len(calls) == 1 and x.grad is not None


def test_the_choice_is_measured_once_and_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    monkeypatch.delenv("EARLYEXIT_SKINNY_LINEAR", raising=False)
    monkeypatch.setattr(skinny, "_rows", None)
    fake = {
        f"{k}{m}": t
        for m in range(1, 5)
        for k, t in (("onednn", 1.0), ("skinny", 1.0 if m == 1 else 0.5))
    }
    fake["skinny1"] = 1.2  # slower than oneDNN by more than the margin at one row
    monkeypatch.setattr(skinny, "_measure", lambda: fake)
    assert skinny.chosen_rows() == frozenset({2, 3, 4})
    (f,) = (tmp_path / "kernels").glob("linear-choice-*.json")
    assert json.loads(f.read_text())["seconds"] == fake
    monkeypatch.setattr(skinny, "_measure", lambda: pytest.fail("measured twice"))
    skinny.reset()
    assert skinny.chosen_rows() == frozenset({2, 3, 4})  # read back, not measured
    # another machine (CPU flags) or torch version does not reuse it
    monkeypatch.setattr(skinny.decode_kernel, "_cpu_identity", lambda: "flags : other")
    monkeypatch.setattr(skinny, "_measure", lambda: {**fake, "skinny1": 1.0})
    skinny.reset()
    assert skinny.chosen_rows() == frozenset({1, 2, 3, 4})
    monkeypatch.setenv("EARLYEXIT_SKINNY_LINEAR", "0")
    skinny.reset()
    assert skinny.chosen_rows() == frozenset()
    skinny.reset()


def test_a_forward_never_builds_or_times_the_kernel_a_decode_cache_does(monkeypatch):
    """Issue 30: nothing compiles or measures inside a forward. Until the choice is made
    (when a CPU fp32 decode cache is created), few rows go through oneDNN."""
    from earlyexit.models.kv_cache import KVCache
    from tests.conftest import make_model

    monkeypatch.setattr(skinny, "_rows", None)
    calls = []
    monkeypatch.setattr(skinny, "chosen_rows", lambda: calls.append(1) or frozenset())
    monkeypatch.setattr(skinny, "skinny_linear", lambda *a: pytest.fail("kernel used"))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, generator=g), torch.randn(8, 16, generator=g)
    with torch.inference_mode():
        y = kernels.linear(x, w)
    torch.testing.assert_close(y, x @ w.T)
    assert not calls
    KVCache.for_model(make_model(n_layers=2), 1, 8)
    assert calls == [1]
