"""Batched, masked Pearson and Spearman correlations: one row per sequence, computed in float64.

Plain tensor functions that stay on the tensors' device and never synchronise with the host (no
``.item()``, no boolean indexing with data-dependent shapes), so they can run inside a training step or
a metric's ``compute`` on the GPU. The inversion metric, the CorR-PO reward and the tests all call them.

Conventions. ``x, y, mask`` have shape ``[B, N]`` (or ``[N]``, treated as one row with a 0-d result).
Row ``b`` uses the pairs ``(x[b, i], y[b, i])`` with ``mask[b, i]`` true; ``n_b`` is their number.
A row's result is NaN, never an exception, when ``n_b < 2`` or either side is constant over the masked
entries (its variance is zero and the correlation is undefined, as in ``scipy.stats``). Masked-out
entries may hold anything, NaN included. A masked NaN makes the row NaN; infinities are not filtered
here (callers drop non-finite pairs, as :class:`~corrpo.inversion.metric.InversionStrength` does).
"""

from __future__ import annotations

import torch

__all__ = ["batched_pearson", "batched_spearman", "rank_average_ties"]


def _rows(
    x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool]:
    """Check shapes, lift ``[N]`` inputs to one row and default the mask to all-true."""
    if y is not None and y.shape != x.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if mask is None:
        mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    elif mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if x.ndim not in (1, 2):
        raise ValueError(f"expected [B, N] or [N] inputs, got shape {tuple(x.shape)}")
    squeeze = x.ndim == 1
    if squeeze:
        x, mask = x[None], mask[None]
        y = None if y is None else y[None]
    return x, y, mask.to(torch.bool), squeeze


def _rank_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`rank_average_ties` on already-checked ``[B, N]`` inputs."""
    b, n = x.shape
    if n == 0:
        return torch.zeros(b, 0, dtype=torch.float64, device=x.device)
    # Sort by value, then stably by "not masked": masked entries come first, in value order, so they
    # hold sorted positions 0 .. n_b - 1 and their ranks are 1 .. n_b whatever the unmasked entries hold.
    order = torch.argsort(x, dim=-1, stable=True)
    unmasked = (~torch.gather(mask, -1, order)).to(torch.uint8)
    order = torch.gather(order, -1, torch.argsort(unmasked, dim=-1, stable=True))
    xs, ms = torch.gather(x, -1, order), torch.gather(mask, -1, order)
    # A tie group is a maximal run of equal values (among masked entries) in sorted order.
    starts = torch.ones_like(ms)
    starts[:, 1:] = (xs[:, 1:] != xs[:, :-1]) | (ms[:, 1:] != ms[:, :-1])
    ends = torch.ones_like(ms)
    ends[:, :-1] = starts[:, 1:]
    j = torch.arange(n, device=x.device).expand(b, n)
    # First/last sorted position of each entry's group: running max of run starts, reversed running min
    # of run ends. The average of 1-based positions first+1 .. last+1 is (first + last) / 2 + 1.
    first = torch.where(starts, j, 0).cummax(-1).values
    last = torch.where(ends, j, n - 1).flip(-1).cummin(-1).values.flip(-1)
    rank_sorted = (first + last).to(torch.float64) / 2 + 1
    ranks = torch.empty(b, n, dtype=torch.float64, device=x.device).scatter_(-1, order, rank_sorted)
    return torch.where(mask, ranks, 0.0)


def rank_average_ties(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""1-based ranks within each row over the masked entries, ties sharing their average rank.

    For row ``b`` with masked values ``v_1 .. v_n``, ``rank(v_i) = #{k : v_k < v_i} + (t_i + 1) / 2``
    where ``t_i = #{k : v_k = v_i}``: a group of ``t`` tied values that would occupy positions
    ``p+1 .. p+t`` all get ``p + (t + 1) / 2``. This is ``scipy.stats.rankdata(method="average")``, and
    it keeps the rank sum ``n (n + 1) / 2``, which is why Spearman's rho stays exact with ties.

    Vectorised: one stable value sort, one stable "masked first" sort, tie runs found by comparing
    neighbours, and each run's first/last position spread with ``cummax``/``cummin`` (no loop over rows).

    Args:
        x: ``[B, N]`` (or ``[N]``) real values.
        mask: same shape, true where an entry takes part; ``None`` means all.

    Returns:
        ``[B, N]`` (or ``[N]``) float64 ranks; unmasked entries are 0. Each masked NaN gets its own rank.
    """
    x, _, mask, squeeze = _rows(x, None, mask)
    ranks = _rank_rows(x, mask)
    return ranks[0] if squeeze else ranks


def _pearson_rows(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`batched_pearson` on already-checked ``[B, N]`` inputs."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    n = mask.sum(-1)
    n_safe = n.clamp_min(1).to(torch.float64)
    # torch.where, not multiplication by the mask: unmasked NaN/inf must not leak (NaN * 0 = NaN).
    mx = torch.where(mask, x, 0.0).sum(-1) / n_safe
    my = torch.where(mask, y, 0.0).sum(-1) / n_safe
    dx = torch.where(mask, x - mx[:, None], 0.0)
    dy = torch.where(mask, y - my[:, None], 0.0)
    cov = (dx * dy).sum(-1)
    # sqrt(vx) * sqrt(vy) rather than sqrt(vx * vy): the product can overflow for large values.
    r = cov / (dx.square().sum(-1).sqrt() * dy.square().sum(-1).sqrt())
    invalid = (n < 2) | _is_constant(x, mask) | _is_constant(y, mask)
    return torch.where(invalid, torch.nan, r.clamp(-1.0, 1.0))


def _is_constant(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """True for rows whose masked entries are all equal (exact: max == min, not a variance threshold).

    The two-pass variance of a constant row is not exactly 0 in floating point (its mean is rounded),
    so testing ``var == 0`` would let a constant row through as a noisy +-1 correlation.
    """
    hi = torch.where(mask, x, -torch.inf).amax(-1)
    lo = torch.where(mask, x, torch.inf).amin(-1)
    return hi == lo


def batched_pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Pearson's r of each row's masked pairs, in float64.

    .. math::
        r_b = \frac{\sum_i m_{bi} (x_{bi} - \bar x_b)(y_{bi} - \bar y_b)}
                   {\sqrt{\sum_i m_{bi} (x_{bi} - \bar x_b)^2} \sqrt{\sum_i m_{bi} (y_{bi} - \bar y_b)^2}},
        \qquad \bar x_b = \frac{\sum_i m_{bi} x_{bi}}{\sum_i m_{bi}}

    Two-pass (centre, then sum products) in float64: the one-pass ``E[xy] - E[x]E[y]`` form cancels
    catastrophically for the large, nearly-constant values that gradient norms can be, and fp16/bf16
    inputs are upcast first (the failure modes of torchmetrics#1725, #3150). The result is clamped to
    ``[-1, 1]`` against rounding.

    Args:
        x, y: ``[B, N]`` (or ``[N]``) values, any real dtype.
        mask: same shape, true where a pair takes part; ``None`` means all.

    Returns:
        ``[B]`` (or 0-d) float64; NaN where ``n_b < 2`` or either side is constant over the masked entries.
    """
    x, y, mask, squeeze = _rows(x, y, mask)
    r = _pearson_rows(x, y, mask)
    return r[0] if squeeze else r


def batched_spearman(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Spearman's rho of each row's masked pairs: Pearson's r of their average ranks, in float64.

    .. math:: \rho_b = r\big(\operatorname{rank}(x_{b\cdot}), \operatorname{rank}(y_{b\cdot})\big)

    with ranks from :func:`rank_average_ties` over the masked entries only. Using Pearson on average
    ranks (not ``1 - 6 \sum d^2 / (n (n^2 - 1))``, which assumes no ties) matches
    ``scipy.stats.spearmanr`` exactly when values tie, as quantised entropies and strengths often do.

    Args:
        x, y: ``[B, N]`` (or ``[N]``) values, any real dtype.
        mask: same shape, true where a pair takes part; ``None`` means all.

    Returns:
        ``[B]`` (or 0-d) float64; NaN where ``n_b < 2``, either side is constant over the masked entries,
        or a masked entry is NaN.
    """
    x, y, mask, squeeze = _rows(x, y, mask)
    rho = _pearson_rows(_rank_rows(x, mask), _rank_rows(y, mask), mask)
    # Ranks hide NaN (each gets a rank), and a constant side has equal ranks, so only NaN needs a check.
    has_nan = (mask & (x.isnan() | y.isnan())).any(-1)
    rho = torch.where(has_nan, torch.nan, rho)
    return rho[0] if squeeze else rho
