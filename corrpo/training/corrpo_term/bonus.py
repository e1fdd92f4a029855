"""The term's values (:class:`CorrPOTerm`), its math on per-response correlations (the bonus), and where it
enters: the rewards or the advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from corrpo.rewards.combine import RewardScores
from corrpo.training.corrpo_term.config import CorrPOTermConfig
from corrpo.training.objectives import RewardScale, group_advantages

STANDARDISE_EPS = 1e-4
"""The ``eps`` of :func:`standardised_bonus`'s ``std + eps``: :func:`group_advantages`' own."""


@dataclass
class CorrPOTerm:
    """The CorR-PO term's values for one rollout batch (``N = B * G`` responses)."""

    bonus: Tensor
    """``[N]`` float32 ``coef * clip(-rho_i, -1, 1)``, 0 for invalid responses."""
    rho: Tensor
    """``[N]`` float64 per-response correlation (NaN where not computable)."""
    valid: Tensor
    """``[N]`` bool: finite ``rho_i`` over at least ``min_tokens`` tokens."""
    coef: float
    """``lambda`` at this RL step (after the warm-up ramp)."""
    entropy: Tensor
    """``[N, L]`` fp32 ``H_t`` (bits) of each completion token the correlation saw (NaN where not scored)."""
    strength: Tensor
    """``[N, L]`` fp32 ``S_t`` of the same tokens (NaN where not scored)."""
    shared_forward: bool = False
    """Scored on the update's own forward (:func:`corrpo_term_on_update_forward`), not by a separate pass."""


def clipped_bonus(rho: Tensor, valid: Tensor) -> Tensor:
    """``b_i = clip(-rho_i, -1, 1)`` for valid responses, 0 otherwise (float64): the unweighted term, before
    :func:`corrpo_bonus` scales (and optionally centres) it or :func:`standardised_bonus` standardises it."""
    return torch.where(valid, (-rho.to(torch.float64)).clamp(-1.0, 1.0), 0.0)


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
    raw = clipped_bonus(rho, valid)
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
        unscorable=scores.unscorable,  # a task concept: the regulariser alone does not make a sample scorable
    )


def standardised_bonus(rho: Tensor, valid: Tensor, eps: float = STANDARDISE_EPS) -> Tensor:
    """``z_i = (b_i - mean_j b_j) / (std_j b_j + eps)`` with ``b_i = clip(-rho_i, -1, 1)``, mean and (unbiased) std
    over the batch's valid responses ``j``; 0 for invalid responses, and everywhere when fewer than two are valid
    (no spread to standardise). float32 ``[N]``.

    Why the batch and not the group: the term's job in ``apply: advantage`` is a signal of known scale beside the
    task advantage (itself about unit scale per group), so that lambda means the same in a group whose task rewards
    all agree (task advantage 0) as in one where they differ; standardising over the batch keeps the differences
    between groups that the correlation really has, where a per-group standardisation would inflate a group whose
    responses correlate almost alike to unit spread."""
    b = clipped_bonus(rho, valid)
    if int(valid.sum()) < 2:
        return torch.zeros_like(b, dtype=torch.float32)
    mean, std = b[valid].mean(), b[valid].std()
    return torch.where(valid, (b - mean) / (std + eps), 0.0).float()


def enter_term(
    term: CorrPOTerm | None,
    config: CorrPOTermConfig,
    scores: RewardScores,
    group_size: int,
    scale: RewardScale,
    device: torch.device | str = "cpu",
    skip_unscorable: bool = True,
) -> tuple[RewardScores, Tensor, Tensor]:
    """The step's reward scores, total rewards and group advantages (both on ``device``) with the term entered where
    ``config`` says.

    - no term, or ``log_only`` (the control): the task's scores and :func:`group_advantages`, untouched;
    - ``apply: reward``: ``r_i' = r_i + bonus_i`` (``bonus_i = lambda * clip(-rho_i, -1, 1)``, logged as the reward
      ``inversion``), then :func:`group_advantages` of ``r'``;
    - ``apply: advantage``: ``A_i' = A_i + lambda * z_i``, ``A`` the task advantage and ``z``
      :func:`standardised_bonus`; the rewards stay the task's.

    ``skip_unscorable`` (``rl.unscorable_rewards: skip``, TRL's handling): a sample no task reward scored
    (``scores.unscorable``) has reward NaN, is left out of its group's baseline and gets advantage 0 in every mode
    (the regulariser does not make it scorable); else it is scored 0 like any other.
    """
    applied = term is not None and not config.log_only
    if applied and config.apply == "reward":
        scores = with_reward_term(scores, "inversion", term.bonus)
    rewards = scores.total.to(device)
    unscorable = scores.unscorable.to(device) if skip_unscorable and scores.unscorable is not None else None
    if unscorable is not None:
        rewards = rewards.masked_fill(unscorable, float("nan"))
    advantages = group_advantages(rewards, group_size, scale)
    if applied and config.apply == "advantage":
        advantages = advantages + term.coef * standardised_bonus(term.rho, term.valid).to(advantages)
    if unscorable is not None:
        advantages = advantages.masked_fill(unscorable, 0.0)
    return scores, rewards, advantages
