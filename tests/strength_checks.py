"""Shared by the strength tests: one padded probe batch and the 1e-4 relative agreement every method must meet."""

from __future__ import annotations

import torch

from corrpo.inversion.strength_common import max_relative_error


def padded_batch(vocab: int, length: int, padding: str = "left") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of ``length`` random ids with left (4 and 1 pad) or right (3 pad) padding, and a token mask with
    one real token left unscored."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, length), generator=gen)
    attn = torch.ones(2, length, dtype=torch.long)
    if padding == "left":
        attn[0, :4] = 0
        attn[1, :1] = 0
    else:
        attn[0, -3:] = 0
    token_mask = attn.bool().clone()
    token_mask[1, 5] = False  # an unscored real token
    return ids, attn, token_mask


def assert_close(values: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """Per-token relative agreement with the reference (NaN where not scored must match too)."""
    err = max_relative_error(values, ref)
    assert err <= tol, f"max relative error {err:.2e} > {tol:.0e}"


def flipped_pairs(values: torch.Tensor, reference: torch.Tensor) -> int:
    """How many pairs ``(i, j)`` the two vectors order differently (ties count as an order of their own)."""
    a, b = values.double(), reference.double()
    order_a = torch.sign(a[:, None] - a[None, :])
    order_b = torch.sign(b[:, None] - b[None, :])
    return int((order_a != order_b).triu(1).sum())


def spearman_flip_bound(
    entropy: torch.Tensor, strength: torch.Tensor, entropy_ref: torch.Tensor, strength_ref: torch.Tensor
) -> float:
    """The largest Spearman gap between ``(entropy, strength)`` and the reference pairs that the pairs whose order
    the two sides disagree on can cause: ``12 (F_H + F_S) / (n (n + 1))`` over ``n`` tokens, ``F`` the flipped pairs.

    Why: a token's rank moves by at most the number of tokens it flips with, so ``sum_i |r'_i - r_i| <= 2 F``; and
    ``rho = 1 - 6 sum_i d_i^2 / (n (n^2 - 1))`` moves by ``12 |sum_i (q_i - (n+1)/2)(r'_i - r_i)| / (n (n^2 - 1))
    <= 6 (n - 1) 2 F / (n (n^2 - 1))`` when one side's ranks ``r`` move against the other's ``q`` (then the other
    side's, by the triangle inequality). No flip: the ranks are the same and so is rho, to rounding. A rank
    statistic of two computations that agree per token to rounding can still differ by a swapped near-tie: this is
    the bound such a swap cannot break, and only such swaps can reach."""
    n = entropy.numel()
    if n < 2:
        return 0.0
    flips = flipped_pairs(entropy, entropy_ref) + flipped_pairs(strength, strength_ref)
    return 12.0 * flips / (n * (n + 1))
