"""The compiled decode-attention kernel (``models/decode_kernel.py``) against attention
written from its definition, and the model paths that use it against those that do not."""

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from earlyexit.errors import InputError
from earlyexit.models import attention, decode_kernel
from earlyexit.models.kv_cache import ForwardContext, KVCache
from tests.conftest import make_model

KERNEL = decode_kernel.load()
if KERNEL is None:  # no C compiler here: the PyTorch paths are all there is
    pytest.skip(f"decode kernel: {decode_kernel.status()}", allow_module_level=True)


def reference_attention(q, keys, values):
    """softmax(q k^T / sqrt(D)) v for one row: q (H, D), keys/values (Hkv, W, D); query head
    h reads kv head h // (H / Hkv). float64, one head at a time."""
    H, D = q.shape
    group = H // keys.shape[0]
    out = []
    for h in range(H):
        k, v = keys[h // group].double(), values[h // group].double()
        s = (k @ q[h].double()) / math.sqrt(D)  # (W,)
        p = torch.exp(s - s.max())
        out.append((p / p.sum()) @ v)
    return torch.stack(out).float()  # (H, D)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("H, Hkv", [(6, 2), (4, 4), (3, 1)])
def test_kernel_appends_and_attends_each_row_over_its_own_block(H, Hkv, T):
    """Rows at different slots, in any row order, with different history lengths and (for
    a chunk) different numbers of new tokens: each row's new entries land at its own (slot,
    row, length..) and nothing else in the cache changes (padding is never written); query
    t of a row attends over exactly its block's first ``length + t + 1`` entries; padding
    queries give zeros."""
    D, S, B, L = 16, 3, 5, 40
    g = torch.Generator().manual_seed(0)
    cache = KVCache(S, B, L, Hkv, D)
    cache.k_all.normal_(generator=g)
    cache.v_all.normal_(generator=g)
    before_k, before_v = cache.k_all.clone(), cache.v_all.clone()
    rows, slots = np.array([3, 0, 4, 1]), np.array([2, 0, 0, 1])
    lens = np.array([7, 0, 40 - T, 20])  # row 0 of slot 0 starts empty; one row fills up
    n_new = np.array([T, max(T - 1, 1), T, 0 if T > 1 else 1])  # ragged, one row padding only
    cache.lengths[slots, rows] = lens
    # q, k, v as the model produces them: views with row strides of a fused projection
    qkv = torch.randn(4, T, (H + 2 * Hkv) * D, generator=g)
    q = qkv[..., : H * D].view(4, T, H, D).transpose(1, 2)
    k = qkv[..., H * D : (H + Hkv) * D].view(4, T, Hkv, D).transpose(1, 2)
    v = qkv[..., (H + Hkv) * D :].view(4, T, Hkv, D).transpose(1, 2)
    blocks, starts, n = cache.reserve(-1, 4, T, _ctx(rows, slots, n_new))
    assert blocks.tolist() == (slots * B + rows).tolist()
    assert starts.tolist() == lens.tolist() and n.tolist() == n_new.tolist()
    assert cache.lengths[slots, rows].tolist() == (lens + n_new).tolist()
    out = KERNEL.append_attend(q, k, v, cache.k_all, cache.v_all, blocks, starts, n)
    assert out.shape == (4, H, T, D)
    want_k, want_v = before_k.clone(), before_v.clone()
    for b in range(4):
        s, r, m = slots[b], rows[b], lens[b]
        for t in range(n_new[b]):
            want_k[s, r, :, m + t], want_v[s, r, :, m + t] = k[b, :, t], v[b, :, t]
        for t in range(T):
            if t >= n_new[b]:
                assert not out[b, :, t].any()
                continue
            W = m + t + 1
            ref = reference_attention(q[b, :, t], want_k[s, r, :, :W], want_v[s, r, :, :W])
            torch.testing.assert_close(out[b, :, t], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k_all, want_k, atol=0, rtol=0)
    torch.testing.assert_close(cache.v_all, want_v, atol=0, rtol=0)
    with pytest.raises(InputError, match=f"KV cache full: {40 + T} entries exceed its length 40"):
        cache.reserve(-1, 1, T, _ctx([4], [0]))  # row 4 of slot 0 is full
    assert cache.lengths[0, 4] == 40  # nothing reserved
    for bad_rows, bad_slots in (([-1], [0]), ([5], [0]), ([1], [-1]), ([1], [3])):
        with pytest.raises(IndexError):  # never a wrapped-around or stray offset
            cache.reserve(-1, 1, T, _ctx(bad_rows, bad_slots))
    for bad_slot in (-1, 3):  # every row at the step's slot
        with pytest.raises(IndexError):
            cache.reserve(bad_slot, 1, T, _ctx([1], None))


def _ctx(rows, slots, n_new=None):
    """A forward's context as ``reserve`` reads it: rows, their slots, new tokens."""
    ctx = ForwardContext(positions=torch.zeros(len(rows), 1, dtype=torch.long), cos=None, sin=None)
    ctx.rows, ctx.kv_slots, ctx.n_new = (
        None if a is None else np.asarray(a, dtype=np.int64) for a in (rows, slots, n_new)
    )
    return ctx


def test_loading_the_kernel_leaves_float_behaviour_alone():
    """The library must not switch the process to flush-to-zero (a -ffast-math link does):
    subnormal floats survive arithmetic in torch and numpy after it is loaded."""
    assert decode_kernel.load() is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 2).item() > 0
    assert float(np.float32(1e-40) * np.float32(2)) > 0


def test_decoding_with_the_kernel_equals_pytorch_attention():
    """A prefill longer than the kernel's chunks, ragged short chunks, then token-by-token
    decoding, rows in an arbitrary order: the kernel path against SDPA's, to float rounding."""
    model = make_model(n_layers=3)
    x = torch.randint(0, model.config.vocab_size, (3, 16))
    rows = np.array([2, 0, 1])
    outs = {}
    for kernel in (True, False):
        cache = KVCache.for_model(model, 3, 20, attention="auto" if kernel else "sdpa")
        assert (cache.kernel is not None) == kernel
        with torch.inference_mode():
            model(x[:, :6], cache=cache, rows=rows, n_new=[6, 5, 6])  # prefill: SDPA
            pos = torch.as_tensor(cache.lengths[0, rows])[:, None] + torch.arange(3)
            chunk = model(x[:, 6:9], pos, cache=cache, rows=rows, n_new=[3, 1, 2])
            steps = []
            for _ in range(4):
                pos = torch.as_tensor(cache.lengths[0, rows])[:, None]
                steps.append(model(x[:, 12:13], pos, cache=cache, rows=rows))
        outs[kernel] = (chunk, torch.cat(steps, 1))
    n_new = [3, 1, 2]
    for b in range(3):  # padding queries' outputs are not defined alike: compare the valid ones
        torch.testing.assert_close(
            outs[True][0][b, : n_new[b]], outs[False][0][b, : n_new[b]], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=1e-5, rtol=1e-5)


def _backend(model, cache, T=1, **kw):
    """The backend a forward context of T new tokens per row gets, built without autograd
    (as every decoding path builds it)."""
    B = cache.batch_size
    with torch.inference_mode():
        return model.context(torch.zeros(B, T, dtype=torch.long), cache, **kw).backend


def test_the_kernel_serves_decode_and_short_chunks_only():
    """Longer chunks (prefill), bf16, sliding windows, autograd and a cache that asks for
    SDPA keep PyTorch's attention; the choice is the context's, made when it is built."""
    model = make_model(n_layers=2)
    cache = KVCache.for_model(model, 2, 8)
    assert cache.kernel is KERNEL and copy.deepcopy(cache).kernel is KERNEL  # one per process
    assert _backend(model, cache) == "kernel"
    assert _backend(model, cache, decode_kernel.MAX_CHUNK) == "kernel"
    assert _backend(model, cache, decode_kernel.MAX_CHUNK + 1) == "sdpa"
    ctx = model.context(torch.zeros(2, 1, dtype=torch.long), cache)  # autograd on
    assert ctx.backend == "sdpa"
    with torch.no_grad():
        ctx = model.context(torch.zeros(2, 1, dtype=torch.long), cache)
        assert ctx.backend == "kernel"
        ctx.sliding_window = 4
        assert attention.choose(ctx) == "sdpa"
    bf = KVCache(2, 2, 8, 1, 4, dtype=torch.bfloat16, kernel=KERNEL)
    assert _backend(model, bf) == "sdpa"
    assert _backend(model, KVCache.for_model(model, 2, 8, attention="sdpa")) == "sdpa"
    assert _backend(model, KVCache(2, 2, 8, 1, 4)) == "sdpa"  # a cache without the kernel


def test_the_backend_is_chosen_once_per_context(monkeypatch):
    """``Decoder.context`` chooses; the steps of the forward only dispatch on its choice."""
    model = make_model(n_layers=3)
    cache = KVCache.for_model(model, 2, 8)
    calls = []
    choose = attention.choose
    monkeypatch.setattr(attention, "choose", lambda ctx: calls.append(1) or choose(ctx))
    with torch.inference_mode():
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)  # prefill
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)  # a decode step
    assert len(calls) == 2  # one per forward, not one per layer
    assert cache.lengths[:, :2].tolist() == [[4, 4]] * model.config.n_kv_slots


def test_env_turns_the_kernel_off(monkeypatch):
    """``EARLYEXIT_DECODE_KERNEL=0``: "disabled", no kernel for new caches, SDPA; unset, the
    kernel is back (being off must not stick)."""
    model = make_model(n_layers=2)
    monkeypatch.setenv("EARLYEXIT_DECODE_KERNEL", "0")
    assert decode_kernel.status() == "disabled" and decode_kernel.load() is None
    cache = KVCache.for_model(model, 2, 8)
    assert cache.kernel is None and _backend(model, cache) == "sdpa"
    monkeypatch.delenv("EARLYEXIT_DECODE_KERNEL")
    assert decode_kernel.status().startswith("compiled: ")
    assert KVCache.for_model(model, 2, 8).kernel is KERNEL


def test_depthwise_mode_is_the_kernel_for_decode_and_says_why_not_when_forced():
    model = make_model(n_layers=2)
    cache = KVCache.for_model(model, 2, 8)
    assert _backend(model, cache, kv_slots=[0, 1]) == "kernel"
    cache.attention = "kernel"
    with pytest.raises(ValueError, match="does not apply here: 5 new tokens per row"):
        _backend(model, cache, decode_kernel.MAX_CHUNK + 1, kv_slots=[0, 1])
    cache.attention = "per-row"  # a depth-wise path named: depth-wise calls take it ...
    assert _backend(model, cache, kv_slots=[0, 1]) == "per-row"
    assert _backend(model, cache) == "kernel"  # ... plain calls stay as auto


def test_a_failed_build_falls_back_and_says_why(tmp_path):
    """No working compiler: a warning with the reason, and decoding runs on SDPA."""
    code = (
        "import torch\n"
        "from earlyexit.models import decode_kernel\n"
        "from earlyexit.models.kv_cache import KVCache\n"
        "from tests.conftest import make_model\n"
        "m = make_model(n_layers=2)\n"
        "c = KVCache.for_model(m, 1, 8)\n"
        "with torch.inference_mode():\n"
        "    m(torch.zeros(1, 3, dtype=torch.long), cache=c)\n"
        "    m(torch.zeros(1, 1, dtype=torch.long), cache=c)\n"
        "print('STATUS', decode_kernel.status())\n"
    )
    env = {**os.environ, "EARLYEXIT_HOME": str(tmp_path), "CC": "false"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "STATUS unavailable: false failed" in res.stdout
    assert "decode attention kernel unavailable, using PyTorch attention" in res.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind
