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
