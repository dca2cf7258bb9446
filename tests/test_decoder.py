"""Model-core equivalences: cached == uncached, ragged rows == single rows, shared blocks."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from earlyexit.config import SharingConfig
from earlyexit.errors import InputError
from earlyexit.models.decoder import Decoder
from earlyexit.models.kernels import linear
from earlyexit.models.kv_cache import KVCache
from tests.conftest import make_model

ATOL = 1e-5


def _incremental(model, x, chunks, batch_rows=None):
    cache = KVCache.for_model(model, x.shape[0], x.shape[1] + 4)
    outs, t = [], 0
    with torch.inference_mode():
        for c in chunks:
            outs.append(model(x[:, t : t + c], cache=cache))
            t += c
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("chunks", [[24], [1] * 24, [7, 1, 1, 15], [5, 10, 9]])
def test_cached_decoding_equals_uncached_forward(tiny, chunks):
    x = torch.randint(0, tiny.config.vocab_size, (3, 24))
    with torch.inference_mode():
        full = tiny(x)
    inc, cache = _incremental(tiny, x, chunks)
    torch.testing.assert_close(inc, full, atol=ATOL, rtol=0)
    assert (cache.lengths == 24).all()


def test_ragged_prompts_in_one_batch_equal_each_row_alone(tiny):
    V = tiny.config.vocab_size
    lens = [5, 11, 1, 8]
    seqs = [torch.randint(0, V, (n + 3,)) for n in lens]  # prompt + 3 decoded tokens
    padded = torch.zeros(4, max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        padded[b, :n] = seqs[b][:n]
    cache = KVCache.for_model(tiny, 4, 32)
    with torch.inference_mode():
        pre = tiny(padded, cache=cache, n_new=lens)
        steps = [
            tiny(torch.stack([s[n + i] for s, n in zip(seqs, lens)])[:, None], cache=cache)
            for i in range(3)
        ]
        for b, n in enumerate(lens):
            ref = tiny(seqs[b][None])[0]  # (n+3, V)
            torch.testing.assert_close(pre[b, :n], ref[:n], atol=ATOL, rtol=0)
            for i in range(3):
                torch.testing.assert_close(steps[i][b, 0], ref[n + i], atol=ATOL, rtol=0)
    assert cache.lengths[0].tolist() == [n + 3 for n in lens]


def test_a_subset_of_rows_and_zero_new_tokens(tiny):
    V = tiny.config.vocab_size
    x = torch.randint(0, V, (3, 10))
    cache = KVCache.for_model(tiny, 3, 16)
    with torch.inference_mode():
        tiny(x[:, :8], cache=cache)
        # rows 2 and 0 (non-contiguous, out of order) advance; row 1 does not run
        out = tiny(x[[2, 0], 8:9], cache=cache, rows=[2, 0])
        torch.testing.assert_close(out[0, 0], tiny(x[2:3, :9])[0, -1], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1, 0], tiny(x[0:1, :9])[0, -1], atol=ATOL, rtol=0)
        assert cache.lengths[0].tolist() == [9, 8, 9]
        # a row with n_new = 0 writes nothing that counts
        tiny(x[:, 9:10], cache=cache, n_new=[1, 0, 1], positions=torch.tensor([[9], [8], [9]]))
        assert cache.lengths[0].tolist() == [10, 8, 10]
        out = tiny(x[1:2, 8:9], cache=cache, rows=[1])
        torch.testing.assert_close(out[0, 0], tiny(x[1:2, :9])[0, -1], atol=ATOL, rtol=0)


def test_sliding_window_cached_equals_uncached():
    model = make_model(sliding_window=5)
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.inference_mode():
        full = model(x)
        no_window = make_model()(x)
    assert (full - no_window).abs().max() > 1e-3  # the window changes the result
    inc, _ = _incremental(model, x, [6, 1, 1, 12])
    torch.testing.assert_close(inc, full, atol=ATOL, rtol=0)


def test_cache_overflow_is_a_clear_error(tiny):
    cache = KVCache.for_model(tiny, 1, 8)
    with torch.inference_mode():
        tiny(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(InputError, match="KV cache full"):
            tiny(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_run_step_pieces_compose_to_forward(tiny):
    x = torch.randint(0, tiny.config.vocab_size, (2, 9))
    with torch.inference_mode():
        ctx = tiny.context(tiny.default_positions(x.shape, None))
        h = tiny.embed(x)
        for i in range(tiny.n_steps):
            h = tiny.run_step(i, h, ctx)
        torch.testing.assert_close(tiny.logits(h), tiny(x), atol=0, rtol=0)


def _unrolled(shared: Decoder) -> Decoder:
    """A dense model whose block i is a copy of the block step i runs."""
    cfg = dataclasses.replace(shared.config, sharing=SharingConfig())
    dense = Decoder(cfg).eval()
    sd = {k: v for k, v in shared.state_dict().items() if not k.startswith("blocks.")}
    for i, step in enumerate(shared.plan):
        for k, v in shared.blocks[step.block].state_dict().items():
            sd[f"blocks.{i}.{k}"] = v.clone()
    dense.load_state_dict(sd)
    return dense


@pytest.mark.parametrize("scheme", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
def test_shared_blocks_equal_the_unrolled_dense_model(scheme):
    shared = make_model(
        n_layers=8 if scheme.startswith("middle") else 6, sharing={"scheme": scheme, "loops": 3}
    )
    assert len(shared.blocks) == shared.config.n_blocks < shared.n_steps
    dense = _unrolled(shared)
    x = torch.randint(0, shared.config.vocab_size, (2, 12))
    with torch.inference_mode():
        torch.testing.assert_close(shared(x), dense(x), atol=ATOL, rtol=0)
        inc, _ = _incremental(shared, x, [8, 1, 3])
        torch.testing.assert_close(inc, dense(x), atol=ATOL, rtol=0)


def test_editing_a_shared_block_changes_every_step_that_runs_it():
    shared = make_model(n_layers=6, sharing={"scheme": "cycle", "loops": 2})
    x = torch.randint(0, shared.config.vocab_size, (1, 6))
    with torch.inference_mode():
        before = shared(x)
        shared.blocks[1].mlp.w2.weight.mul_(0)
        after = shared(x)
    assert (before - after).abs().max() > 1e-4
    dense = _unrolled(shared)  # both copies of block 1 see the edit
    with torch.inference_mode():
        torch.testing.assert_close(dense(x), after, atol=ATOL, rtol=0)


def test_fast_linear_matches_reference_and_keeps_gradients():
    x, w, b = torch.randn(2, 3, 16), torch.randn(8, 16), torch.randn(8)
    with torch.inference_mode():
        torch.testing.assert_close(
            linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5
        )
    w.requires_grad_(True)
    linear(x, w, b).sum().backward()  # autograd path: plain F.linear
    torch.testing.assert_close(w.grad, x.reshape(-1, 16).sum(0).expand(8, 16))


def test_bfloat16_forward_runs_and_stays_close(tiny):
    x = torch.randint(0, tiny.config.vocab_size, (2, 12))
    bf = copy.deepcopy(tiny).to(torch.bfloat16)
    with torch.inference_mode():
        ref = tiny(x)
        out = bf(x).float()
        inc, _ = _incremental(bf, x, [6, 1, 5])
    # bf16 has 8 mantissa bits: stated tolerance 5% of the logit scale
    scale = ref.abs().max()
    assert (out - ref).abs().max() < 0.05 * scale
    assert (inc.float() - out).abs().max() < 0.05 * scale


def test_positions_continue_each_row(tiny):
    cache = KVCache.for_model(tiny, 2, 16)
    cache.lengths[:, 1] = 5
    pos = tiny.default_positions((2, 3), cache)
    assert pos.tolist() == [[0, 1, 2], [5, 6, 7]]
    np.testing.assert_array_equal(cache.lengths[:, 0], 0)


def test_padding_never_writes_past_a_rows_capacity(tiny):
    """A row near the end of its cache can share a chunk with a row writing many tokens."""
    V = tiny.config.vocab_size
    seqs = [torch.randint(0, V, (10,)) for _ in range(2)]
    cache = KVCache.for_model(tiny, 2, 10)
    with torch.inference_mode():
        tiny(torch.stack([seqs[0][:9], seqs[1][:9]]), cache=cache, n_new=[9, 2])
        chunk = torch.stack([torch.cat([seqs[0][9:10], seqs[0][:4]]), seqs[1][2:7]])  # (2, 5)
        out = tiny(
            chunk, cache=cache, n_new=[1, 5], positions=torch.tensor([[9] * 5, [2, 3, 4, 5, 6]])
        )
        assert cache.lengths[0].tolist() == [10, 7]
        torch.testing.assert_close(out[0, 0], tiny(seqs[0][None])[0, 9], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1], tiny(seqs[1][None, :7])[0, 2:7], atol=ATOL, rtol=0)


def test_sliding_window_on_rows_out_of_order_and_reset():
    """The window mask on a cache batch whose rows run out of order and ragged (the
    gathered-rows path), and ``reset`` forgetting exactly the rows it names."""
    model = make_model(sliding_window=3, n_layers=2)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    cache = KVCache.for_model(model, 3, 12)
    with torch.inference_mode():
        full = model(x)
        a = model(x[:, :5], cache=cache, rows=[2, 0], n_new=[5, 4])  # row 0 gets 4 tokens
        torch.testing.assert_close(a[0], full[0, :5], atol=ATOL, rtol=0)
        torch.testing.assert_close(a[1, :4], full[1, :4], atol=ATOL, rtol=0)
        nxt = torch.stack([x[0, 5:7], x[1, 4:6]])  # each row's next two tokens
        b = model(nxt, cache=cache, rows=[2, 0])
        torch.testing.assert_close(b[0], full[0, 5:7], atol=ATOL, rtol=0)
        torch.testing.assert_close(b[1], full[1, 4:6], atol=ATOL, rtol=0)
        c = model(x[:1, 7:8], cache=cache, rows=[2])
        torch.testing.assert_close(c[0], full[0, 7:8], atol=ATOL, rtol=0)
    assert cache.lengths[:, [2, 0, 1]].tolist() == [[8, 6, 0]] * 2
    cache.reset([2])
    assert cache.lengths[:, [2, 0, 1]].tolist() == [[0, 6, 0]] * 2
    cache.reset()
    assert not cache.lengths.any()


def test_kv_cache_update_against_its_definition():
    """KVCache.update by hand: one forward context writing two slots whose rows hold
    different lengths; each call appends at each row's own length, returns every valid
    entry and a mask that is causal by index (padding queries see one slot of their own)."""
    from earlyexit.models.kv_cache import ForwardContext

    cache = KVCache(n_slots=2, batch_size=2, max_len=8, n_kv_heads=1, head_dim=2)
    cache.lengths[:] = [[3, 1], [5, 2]]  # slot 0: rows hold 3 and 1 entries; slot 1: 5 and 2
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 1, 2, 2, generator=g)  # (B, Hkv, T=2, D)
    v = torch.randn(2, 1, 2, 2, generator=g)
    n_new = np.array([2, 1])  # row 1's second token is padding
    ctx = ForwardContext(positions=torch.tensor([[9, 9], [9, 9]]), cos=None, sin=None)
    ctx.n_new = n_new
    for slot in (0, 1):
        lens = cache.lengths[slot].copy()
        keys, vals, mask = cache.update(slot, k, v, ctx)
        W = int((lens + n_new).max())
        assert (
            keys.shape == (2, 1, W, 2) and cache.lengths[slot].tolist() == (lens + n_new).tolist()
        )
        for b in range(2):
            for t in range(n_new[b]):  # written at the row's own length
                torch.testing.assert_close(cache.k[slot][b, :, lens[b] + t], k[b, :, t])
                torch.testing.assert_close(vals[b, :, lens[b] + t], v[b, :, t])
            for t in range(2):
                q = lens[b] + t
                want = [j <= q and j < lens[b] + n_new[b] for j in range(W)]
                if t >= n_new[b]:  # a padding query sees exactly one (clamped) slot
                    want = [j == min(q, W - 1) or w for j, w in enumerate(want)]
                assert mask[b, 0, t].tolist() == want, (slot, b, t)
    with pytest.raises(ValueError, match=r"n_new must be within \[0, 2\]"):
        bad = ForwardContext(positions=torch.zeros(2, 2, dtype=torch.long), cos=None, sin=None)
        bad.n_new = np.array([3, 1])
        cache.update(0, k, v, bad)


def test_kv_cache_per_row_slots_and_read_against_their_definitions():
    """Rows at different steps (each its own slot, depth-wise batching) appending ragged
    chunks, with a sliding window's positions kept; and the read-only view KV sharing uses:
    every entry of the row up to the query's position, whichever rows are asked for."""
    from earlyexit.models.kv_cache import ForwardContext

    cache = KVCache(n_slots=3, batch_size=3, max_len=8, n_kv_heads=1, head_dim=2)
    cache.lengths[:] = [[2, 0, 4], [1, 3, 0], [0, 0, 5]]
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, 1, 2, 2, generator=g)  # (B, Hkv, T=2, D)
    v = torch.randn(3, 1, 2, 2, generator=g)
    slots, rows, n_new = np.array([0, 1, 2]), np.array([2, 1, 0]), np.array([2, 1, 2])
    pos = torch.tensor([[4, 5], [3, 4], [0, 1]])
    ctx = ForwardContext(positions=pos, cos=None, sin=None, sliding_window=100)
    ctx.rows, ctx.kv_slots, ctx.n_new = rows, slots, n_new
    lens = cache.lengths[slots, rows].copy()  # [4, 3, 0]
    keys, vals, mask = cache.update(-1, k, v, ctx)
    W = int((lens + n_new).max())
    assert keys.shape == (3, 1, W, 2)
    assert cache.lengths[slots, rows].tolist() == (lens + n_new).tolist()
    for b in range(3):
        s, r = slots[b], rows[b]
        for t in range(n_new[b]):
            torch.testing.assert_close(cache.k[s][r, :, lens[b] + t], k[b, :, t])
            torch.testing.assert_close(vals[b, :, lens[b] + t], v[b, :, t])
            assert int(cache.pos[s][r, lens[b] + t]) == int(pos[b, t])
        for t in range(2):
            q = lens[b] + t
            want = [j <= q and j < lens[b] + n_new[b] for j in range(W)]
            if t >= n_new[b]:
                want = [j == min(q, W - 1) or w for j, w in enumerate(want)]
            assert mask[b, 0, t].tolist() == want, (b, t)
    with pytest.raises(InputError) as e:
        ctx2 = ForwardContext(positions=pos, cos=None, sin=None)
        ctx2.rows, ctx2.kv_slots, ctx2.n_new = rows, slots, np.array([2, 1, 9])
        cache.update(-1, torch.zeros(3, 1, 9, 2), torch.zeros(3, 1, 9, 2), ctx2)
    assert str(e.value) == "KV cache full: 11 entries exceed its length 8"
    # read: slot 0 holds 2, 0 and 6 entries in rows 0, 1, 2 (row 2's at positions 0..5)
    cache.pos[0][2, :6] = torch.arange(6)
    for ask in ([2], [1, 2], [2, 0]):
        qpos = torch.tensor([[3]] * len(ask))
        rctx = ForwardContext(positions=qpos, cos=None, sin=None)
        rctx.rows = np.array(ask)
        rk, rv, rmask = cache.read(0, rctx)
        n = cache.lengths[0, ask]
        assert rk.shape[2] == max(int(n.max()), 1)
        for i, r in enumerate(ask):
            want = [j < n[i] and j <= 3 for j in range(rk.shape[2])]
            assert rmask[i, 0, 0].tolist() == want
            torch.testing.assert_close(rk[i, :, : n[i]], cache.k[0][r, :, : n[i]])
            torch.testing.assert_close(rv[i, :, : n[i]], cache.v[0][r, :, : n[i]])
