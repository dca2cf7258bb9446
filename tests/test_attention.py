"""The attention/KV seam (``models/attention.py``): the backend is chosen once per forward
context, from the cache and the request; no forward builds or loads the decode kernel."""

import numpy as np
import pytest
import torch

from earlyexit.models import attention, decode_kernel
from earlyexit.models.kv_cache import KVCache
from tests.conftest import make_model

FAKE_KERNEL = object()  # the choice only asks whether the cache carries a kernel


def _backend(model, cache, T=1, grad=False, **kw):
    with torch.set_grad_enabled(grad):
        return model.context(torch.zeros(2, T, dtype=torch.long), cache, **kw).backend


def test_the_backend_follows_the_cache_the_rows_and_the_tokens():
    model = make_model(n_layers=2)
    cfg = model.config
    assert model.context(torch.zeros(2, 4, dtype=torch.long)).backend == "uncached"

    def cache(dtype=torch.float32, kernel=FAKE_KERNEL, length=8):
        return KVCache(
            cfg.n_kv_slots, 2, length, cfg.n_kv_heads, cfg.head_dim, "cpu", dtype, kernel
        )

    assert _backend(model, cache()) == "kernel"  # CPU fp32 decode, the kernel loaded
    assert _backend(model, cache(), T=decode_kernel.MAX_CHUNK + 1) == "sdpa"  # prefill
    assert _backend(model, cache(torch.bfloat16)) == "sdpa"
    assert _backend(model, cache(kernel=None)) == "sdpa"  # not loaded: never built here
    assert _backend(model, cache(), grad=True) == "sdpa"  # autograd never runs the kernel
    assert _backend(model, cache(), kv_slots=[0, 1]) == "kernel"  # rows at two slots
    c = cache(kernel=None, length=600)  # rows at two slots on PyTorch: by history length
    assert _backend(model, c, kv_slots=[0, 1]) == "per-slot"
    c.lengths[[0, 1], [0, 1]] = attention.PER_ROW_MIN_ENTRIES
    assert _backend(model, c, kv_slots=[0, 1]) == "per-row"
    assert _backend(model, c, rows=[0, 1]) == "sdpa"  # one slot for every row
    for forced in ("per-slot", "per-row", "gather"):
        c.attention = forced
        assert _backend(model, c, kv_slots=[0, 1]) == forced
    c.attention = "nonsense"
    with pytest.raises(ValueError, match=r"KVCache\.attention must be one of"):
        _backend(model, c)


def test_no_forward_builds_or_loads_the_kernel(monkeypatch):
    """A cache made without the kernel asks for it (``auto``) yet every forward, prefill and
    decode, runs on SDPA and equals the uncached forward: nothing inside a forward compiles
    or loads anything."""

    def boom(*a, **k):
        raise AssertionError("the decode kernel was built or loaded inside a forward")

    model = make_model(n_layers=3)
    x = torch.randint(0, model.config.vocab_size, (2, 7))
    cache = KVCache.for_model(model, 2, 8, attention="sdpa")  # built without the kernel
    cache.attention = "auto"
    for name in ("load", "_load"):
        monkeypatch.setattr(decode_kernel, name, boom)
    build = decode_kernel._build  # shared with the few-row linear (skinny.py): only ours fails

    def build_linear_only(cc, source=decode_kernel.SOURCE):
        return boom() if source == decode_kernel.SOURCE else build(cc, source)

    monkeypatch.setattr(decode_kernel, "_build", build_linear_only)
    with torch.inference_mode():
        assert model.context(x[:, :1], cache).backend == "sdpa"
        out = [model(x[:, :5], cache=cache)]
        out += [model(x[:, t : t + 1], cache=cache) for t in range(5, 7)]
        want = model(x)
    torch.testing.assert_close(torch.cat(out, 1), want, atol=1e-5, rtol=1e-5)


def test_one_error_for_a_full_cache_on_every_path():
    """Plain, depth-wise and kernel reservations alike: the same error, nothing written."""
    from earlyexit.errors import InputError
    from earlyexit.models.kv_cache import ForwardContext

    cache = KVCache(n_slots=2, batch_size=2, max_len=4, n_kv_heads=1, head_dim=2)
    cache.lengths[:] = 3
    k = torch.zeros(2, 1, 2, 2)
    ctx = ForwardContext(positions=torch.zeros(2, 2, dtype=torch.long), cos=None, sin=None)
    dctx = ForwardContext(positions=torch.zeros(2, 2, dtype=torch.long), cos=None, sin=None)
    dctx.kv_slots = np.array([0, 1])
    calls = (
        lambda: cache.update(0, k, k, ctx),
        lambda: cache.append(1, k, k, ctx),
        lambda: cache.update(-1, k, k, dctx),
        lambda: cache.update_slots(k, k, dctx),
        lambda: cache.update_rows(k, k, dctx),
        lambda: cache.reserve(0, 2, 2, ctx),
    )
    for call in calls:
        with pytest.raises(InputError, match=r"^KV cache full: 5 entries exceed its length 4$"):
            call()
        assert (cache.lengths == 3).all()
