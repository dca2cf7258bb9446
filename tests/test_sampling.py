"""The sampler: greedy, temperature, top-k, top-p semantics, seeding, validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from earlyexit.decoding.sampling import SamplingParams, make_generator, sample
from earlyexit.errors import InputError


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(3, 100)
    a = [sample(logits, 1.0, generator=make_generator(7)).tolist() for _ in range(2)]
    b = sample(logits, 1.0, generator=make_generator(8)).tolist()
    assert a[0] == a[1]
    draws = {tuple(sample(logits, 1.0, generator=make_generator(s)).tolist()) for s in range(20)}
    assert len(draws) > 1 and (b in [list(d) for d in draws])


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(2, 64)
    top = logits.topk(5, dim=-1).indices
    g = make_generator(0)
    for _ in range(200):
        s = sample(logits, 2.0, top_k=5, generator=g)
        assert all(s[b] in top[b] for b in range(2))
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))


def test_top_p_matches_transformers_warper():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(3, 40) * 3
    for p in (0.3, 0.7, 0.95):
        warper = transformers.TopPLogitsWarper(top_p=p)
        allowed = ~torch.isinf(warper(None, logits.clone()))
        g = make_generator(1)
        seen = torch.zeros_like(allowed)
        for _ in range(400):
            s = sample(logits, 1.0, top_p=p, generator=g)
            seen[torch.arange(3), s] = True
        assert not (seen & ~allowed).any()  # never outside the nucleus
        assert (seen == allowed).float().mean() > 0.95  # and explores it


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    g = make_generator(3)
    n = 20000
    counts = torch.bincount(sample(logits.expand(n, 4), 1.0, generator=g), minlength=4).float()
    assert torch.allclose(counts / n, logits.softmax(-1)[0], atol=0.015)


def test_per_row_parameters():
    logits = torch.randn(3, 30)
    g = make_generator(0)
    out = sample(logits, [0.0, 1.0, 0.0], top_k=[-1, 1, 3], top_p=[1.0, 1.0, 0.5], generator=g)
    assert (
        out[0] == logits[0].argmax()
        and out[1] == logits[1].argmax()
        and out[2] == logits[2].argmax()
    )


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (999,)}, "stop_token_ids"),
    ],
)
def test_invalid_sampling_values_are_refused(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        SamplingParams(**kwargs).validate(vocab_size=100)


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(st.floats(-30, 30, width=32), min_size=2, max_size=12),
    temperature=st.one_of(
        st.sampled_from([0.0, 1e-300, 1e-45, 1e-40, 1e-20, 1e-6, 1e-5]),
        st.floats(0, 2, allow_subnormal=True),
    ),
    top_p=st.one_of(
        st.sampled_from([1e-300, 1e-46, 1e-40, 1e-8, 1.0 - 1e-12, 1.0]),
        st.floats(0, 1, exclude_min=True, allow_subnormal=True),
    ),
    top_k=st.integers(-1, 13),
    seed=st.integers(0, 2**32),
)
def test_extreme_sampling_values_stay_finite_and_in_the_support(
    logits, temperature, top_p, top_k, seed
):
    """Issue 16: temperature 1e-40 or top_p 1e-46 became 0 in float32, the distribution
    NaN and the token 0. The token must come from the distribution a float64 reference
    defines: greedy below temperature 1e-5 (vLLM's rule), else inside top-k and top-p."""
    tok = int(sample(torch.tensor([logits]), temperature, top_k, top_p, make_generator(seed))[0])
    x = torch.tensor(logits, dtype=torch.float64)
    top = int(x.argmax())
    if temperature < 1e-5:
        assert tok == top
        return
    x = x / temperature
    V = len(logits)
    if 0 < top_k < V:
        x = torch.where(x < x.topk(top_k).values[-1], float("-inf"), x)
    p = x.softmax(-1)
    above = torch.tensor([p[p > p[j]].sum() for j in range(V)], dtype=torch.float64)
    support = (above < top_p * (1 + 1e-3) + 1e-6) & (x > float("-inf"))
    assert bool(support[tok]), (tok, p.tolist())
    if top_p < p[top] * (1 - 1e-3) and (x == x[top]).sum() == 1:  # the top token alone
        assert tok == top
