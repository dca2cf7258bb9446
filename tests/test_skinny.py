"""The compiled few-row linear (``models/skinny.py``): exact against float64, and a row's
result independent of the rows beside it. Where it runs: tests/test_linear_choice.py."""

import pytest
import torch

from earlyexit.models import skinny

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
