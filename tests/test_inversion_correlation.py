"""Batched masked Pearson/Spearman and average ranks against scipy.stats, edge cases included."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from corrpo.inversion.correlation import batched_pearson, batched_spearman, rank_average_ties


def _random_rows(seed: int, b: int = 8, n: int = 40, ties: bool = False, dtype=torch.float64):
    """Rows with varied mask lengths (row b keeps a random subset of size >= 2), optionally tie-heavy."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(0, 4, (b, n), generator=g).to(dtype)
        y = torch.randint(0, 3, (b, n), generator=g).to(dtype)
    else:
        x = torch.randn(b, n, generator=g).to(dtype)
        y = (0.5 * x.double() + torch.randn(b, n, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        keep = torch.randperm(n, generator=g)[: int(torch.randint(3, n + 1, (1,), generator=g))]
        mask[row, keep] = True
    return x, y, mask


def _scipy_rows(fn, x, y, mask):
    out = []
    for row in range(x.shape[0]):
        xs, ys = x[row][mask[row]].double().numpy(), y[row][mask[row]].double().numpy()
        out.append(fn(xs, ys)[0])
    return np.array(out)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_average_ties_matches_rankdata(ties):
    x, _, mask = _random_rows(0, ties=ties)
    ranks = rank_average_ties(x, mask)
    assert ranks.dtype == torch.float64 and ranks.shape == x.shape
    for row in range(x.shape[0]):
        expected = stats.rankdata(x[row][mask[row]].numpy(), method="average")
        np.testing.assert_array_equal(ranks[row][mask[row]].numpy(), expected)
        assert (ranks[row][~mask[row]] == 0).all()


def test_rank_average_ties_ignores_unmasked_values():
    # Unmasked entries equal to, below, or NaN must not shift or join the masked ranks.
    x = torch.tensor([[2.0, 1.0, 2.0, 1.0, float("nan"), -5.0, 2.0]])
    mask = torch.tensor([[True, True, True, False, False, False, False]])
    np.testing.assert_array_equal(rank_average_ties(x, mask)[0, :3].numpy(), [2.5, 1.0, 2.5])
    unmasked = rank_average_ties(torch.tensor([3.0, 1.0, 3.0, 2.0]))
    np.testing.assert_array_equal(unmasked.numpy(), [3.5, 1, 3.5, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_spearman_and_pearson_match_scipy(dtype, ties):
    x, y, mask = _random_rows(1 + ties, dtype=dtype, ties=ties)
    rho, r = batched_spearman(x, y, mask), batched_pearson(x, y, mask)
    assert rho.dtype == r.dtype == torch.float64 and rho.shape == r.shape == (x.shape[0],)
    np.testing.assert_allclose(rho.numpy(), _scipy_rows(stats.spearmanr, x, y, mask), atol=1e-12)
    np.testing.assert_allclose(r.numpy(), _scipy_rows(stats.pearsonr, x, y, mask), atol=1e-12)


def test_one_dimensional_input_gives_a_scalar():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, generator=g), torch.randn(50, generator=g)
    rho = batched_spearman(x, y)
    assert rho.shape == ()
    assert math.isclose(rho.item(), stats.spearmanr(x.numpy(), y.numpy())[0], abs_tol=1e-12)
    r_ref = stats.pearsonr(x.double().numpy(), y.double().numpy())[0]
    assert math.isclose(batched_pearson(x, y).item(), r_ref, abs_tol=1e-12)


def test_degenerate_rows_are_nan():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    mask = torch.ones(5, 6, dtype=torch.bool)
    x[0] = 0.1  # constant x (its float mean is not exactly 0.1: the exact max == min test is needed)
    y[1] = -3.0  # constant y
    mask[2] = False  # no pairs
    mask[3] = False
    mask[3, 2] = True  # one pair
    x[4, 5] = float("nan")  # unmasked NaN must not matter
    mask[4, 5] = False
    for fn in (batched_spearman, batched_pearson):
        out = fn(x, y, mask)
        assert out[:4].isnan().all(), fn.__name__
        assert out[4].isfinite()
    # Constant over the masked entries only, though the row as a whole varies.
    xc = torch.tensor([[1.0, 1.0, 1.0, 9.0]])
    yc = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mc = torch.tensor([[True, True, True, False]])
    assert batched_spearman(xc, yc, mc).isnan().all() and batched_pearson(xc, yc, mc).isnan().all()


def test_masked_nan_gives_nan_and_two_pairs_give_plus_minus_one():
    x = torch.tensor([[1.0, float("nan"), 3.0], [1.0, 2.0, 0.0]])
    y = torch.tensor([[1.0, 2.0, 3.0], [5.0, 4.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rho, r = batched_spearman(x, y, mask), batched_pearson(x, y, mask)
    assert rho[0].isnan() and r[0].isnan()
    assert math.isclose(rho[1].item(), -1.0, abs_tol=1e-12) and math.isclose(r[1].item(), -1.0, abs_tol=1e-12)


def test_large_offset_is_stable_in_float64():
    # Values around 1e8 with unit spread: a one-pass E[xy] - E[x]E[y] would lose everything in fp32.
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 200, generator=g, dtype=torch.float64)
    x, y = 1e8 + base, 1e8 + base + 0.1 * torch.randn(1, 200, generator=g, dtype=torch.float64)
    expected = stats.pearsonr(x[0].numpy(), y[0].numpy())[0]
    assert math.isclose(batched_pearson(x, y).item(), expected, abs_tol=1e-9)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        batched_pearson(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        batched_spearman(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2, dtype=torch.bool))
