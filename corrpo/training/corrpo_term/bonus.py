"""The term's math on per-response correlations: the bonus, and how it enters the rewards or the advantages."""

from __future__ import annotations

import torch
from torch import Tensor

from corrpo.rewards.combine import RewardScores


def corrpo_bonus(
    rho: Tensor, n_tokens: Tensor, coef: float, min_tokens: int, group_size: int, center: bool = False
) -> tuple[Tensor, Tensor]:
    """``bonus_i = coef * clip(-rho_i, -1, 1)`` for valid responses, 0 otherwise.

    ``valid_i = isfinite(rho_i) and n_tokens_i >= min_tokens``. Negative ``rho`` (the inversion: high-entropy
    tokens carry weak gradients) earns a positive bonus. With ``center``, each group's valid bonuses are
    shifted by their mean, ``b_i - mean_{j valid in group} b_j``, so the term rewards inversion RELATIVE to
    the siblings; invalid members stay exactly 0. (Note: a shift common to a whole group cancels in the GRPO
    group mean anyway; centring matters for ``scale_rewards: batch|none`` and for groups with invalid members.)

    Args:
        rho: ``[N]`` correlations (NaN allowed), ``N = B * G`` prompt-major.
        n_tokens: ``[N]`` pairs behind each ``rho_i``.
        coef: ``lambda`` (e.g. ``CorrPOTermConfig.coef_at(step)``); 0 gives exact zeros.
        min_tokens: fewest tokens for a valid response.
        group_size: ``G``.
        center: subtract the mean over the valid members of each group.

    Returns:
        ``bonus [N]`` float32 (finite everywhere) and ``valid [N]`` bool.
    """
    if rho.ndim != 1 or rho.shape != n_tokens.shape:
        raise ValueError(f"rho and n_tokens must both be [N], got {tuple(rho.shape)} and {tuple(n_tokens.shape)}")
    if group_size < 1 or rho.numel() % group_size:
        raise ValueError(f"N={rho.numel()} responses is not a multiple of group_size={group_size}")
    valid = rho.isfinite() & (n_tokens >= min_tokens)
    raw = torch.where(valid, (-rho.to(torch.float64)).clamp(-1.0, 1.0), 0.0)
    if center:
        grouped, mask = raw.view(-1, group_size), valid.view(-1, group_size)
        mean = grouped.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
        raw = torch.where(mask, grouped - mean, 0.0).view(-1)
    return (coef * raw).to(torch.float32), valid


def with_reward_term(scores: RewardScores, name: str, values: Tensor) -> RewardScores:
    """A new :class:`RewardScores` with one more per-response term ``name`` added to the total (weight 1)."""
    values = values.detach().float().cpu()
    return RewardScores(
        per_function={**scores.per_function, name: values},
        total=scores.total + values,
        n_failed=dict(scores.n_failed),
        n_unscored=dict(scores.n_unscored),
    )
