r"""The CorR-PO reward term: a per-response bonus for the entropy-gradient inversion, as plain functions.

The paper does not publish its formula; ours is explicit and configurable (``rl.inversion.*``):

.. math::
    r_i' = r_{\text{task},i} + \lambda \cdot \operatorname{clip}(-\rho_i, -1, 1)

where :math:`\rho_i` is the Spearman (or Pearson) correlation between token entropy :math:`H_t` (bits) and the
gradient strength :math:`S_t` of the chosen token's raw logit, over response :math:`i`'s OWN completion tokens
only. :math:`r_i'` then enters the usual group-normalised GRPO advantage; :math:`\lambda = 0` is plain GRPO
(nothing is computed).

Why per response: the advantage ranks the ``G`` responses to one prompt against each other, so the bonus must
differ between them; a batch-level correlation would add the same constant to every member of a group and
cancel in the group mean. Pooling over the prompt tokens would mix in text the policy did not choose.

Why the clip: :math:`\rho \in [-1, 1]` already; the clip only guards a rounding excursion and documents the
scale (the bonus is at most :math:`|\lambda|`, comparable to a 0/1 accuracy reward when :math:`\lambda \le 1`).

Responses with too few scored tokens (``min_tokens``) or an undefined correlation (constant entropy, < 2 tokens)
get bonus 0 and ``valid = False``: never NaN, which ``group_advantages`` would reject.

All the math is called from :mod:`corrpo.inversion` (``score_tokens``, ``batched_spearman``,
``batched_pearson``); nothing is re-implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from corrpo.inversion.correlation import batched_pearson, batched_spearman
from corrpo.inversion.strength import score_tokens
from corrpo.inversion.strength_config import REWARD_STRENGTH_DEFAULTS, StrengthConfig, strength_spec

__all__ = [
    "CORRELATIONS",
    "InversionRewardConfig",
    "inversion_bonus",
    "response_correlations",
    "rollout_correlations",
]

CORRELATIONS = ("spearman", "pearson")


@dataclass
class InversionRewardConfig:
    """``rl.inversion``: the CorR-PO reward term ``lambda * clip(-rho_i, -1, 1)``."""

    coef: float = 0.0
    """``lambda``, the bonus weight; 0 = plain GRPO (no scoring pass at all)."""
    warmup_steps: int = 0
    """``lambda`` ramps linearly from 0 to ``coef`` over the first ``warmup_steps`` RL steps."""
    correlation: Literal["spearman", "pearson"] = "spearman"
    """``spearman`` (the headline) or ``pearson``."""
    strength: StrengthConfig = field(default_factory=lambda: StrengthConfig(**REWARD_STRENGTH_DEFAULTS))
    """The gradient strength ``S_t`` (:class:`corrpo.inversion.strength_config.StrengthConfig`); its default
    projections are ``[q, v, o]`` (``REWARD_STRENGTH_DEFAULTS``: K is the costly closed form)."""
    min_tokens: int = 8
    """Responses with fewer scored completion tokens get no bonus (too noisy a correlation)."""
    center: bool = False
    """Subtract the mean bonus over each group's valid members (invalid members stay 0)."""
    shared_forward: bool = True
    """Score the term on the update's OWN forward when that is exact (``method: onepass``, the update in one
    micro-batch, no active dropout, no gradient checkpointing): the same bonus without a forward of its own.
    False: always a separate scoring pass (the reference the shared one is tested against)."""
    rows_per_chunk: int | None = None
    """Responses per scoring forward/backward (bounds the scoring pass's memory: its logits are
    ``rows x sequence x vocabulary``); None = ``rl.micro_batch_size``, or 64 when that is unset too."""

    def __post_init__(self) -> None:
        if isinstance(self.coef, bool) or not isinstance(self.coef, int | float) or not math.isfinite(self.coef):
            raise ValueError(f"rl.inversion.coef must be a finite number, got {self.coef!r}")
        if self.coef < 0:
            raise ValueError(f"rl.inversion.coef must be >= 0 (0 = plain GRPO), got {self.coef!r}")
        for key in ("warmup_steps", "min_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"rl.inversion.{key} must be an int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"rl.inversion.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_tokens < 2:
            raise ValueError(
                f"rl.inversion.min_tokens must be >= 2 (a correlation needs 2 tokens), got {self.min_tokens}"
            )
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"rl.inversion.correlation must be one of {CORRELATIONS}, got {self.correlation!r}")
        if not isinstance(self.shared_forward, bool):
            raise ValueError(f"rl.inversion.shared_forward must be true or false, got {self.shared_forward!r}")
        rows = self.rows_per_chunk
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"rl.inversion.rows_per_chunk must be a positive int or null, got {rows!r}")
        self.strength = strength_spec(self.strength, "rl.inversion.strength", REWARD_STRENGTH_DEFAULTS)

    def coef_at(self, rl_step: int) -> float:
        """``lambda`` at 0-based RL step ``rl_step``: ``coef * min(1, rl_step / warmup_steps)``.

        0 at the first RL step, ``coef`` from step ``warmup_steps`` on (at once when ``warmup_steps = 0``).
        The ramp lets the group statistics of the task reward settle before the bonus competes with them.
        """
        if self.warmup_steps <= 0:
            return float(self.coef)
        return float(self.coef) * min(1.0, max(rl_step, 0) / self.warmup_steps)


def _trim_left(attention_mask: Tensor) -> int:
    """First column holding a real token in any row (left padding shared by all rows can be dropped)."""
    real_cols = attention_mask.bool().any(dim=0).nonzero()
    return int(real_cols[0]) if real_cols.numel() else 0


def rollout_correlations(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    completion_token_mask: Tensor,
    config: InversionRewardConfig,
    rows_per_chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """Per response ``i``: ``rho_i = corr(H_t, S_t)`` over its own scored completion tokens ``t``.

    ``H_t`` (entropy, bits) and ``S_t`` (gradient strength) come from one :func:`score_tokens` call per chunk
    of rows with ``token_mask = completion_token_mask`` (sequence coordinates: token ``t`` is predicted at
    ``t - 1``); each row's correlation is then :func:`batched_spearman` / :func:`batched_pearson` over the
    pairs where both are finite. Rows are independent, so chunking (and dropping the left-padding columns a
    chunk shares) changes nothing but memory and time.

    Args:
        model: the policy (any mode/grad state; both are restored by ``score_tokens``).
        sequences: ``[N, S]`` prompt + completion ids (e.g. ``Rollout.sequences``).
        attention_mask: ``[N, S]`` 1 on real tokens.
        completion_token_mask: ``[N, S]`` bool, True on the completion tokens that count.
        config: the strength definition and the correlation kind.
        rows_per_chunk: responses scored per ``score_tokens`` call.

    Returns:
        ``rho [N]`` float64 (NaN where not computable: < 2 tokens or a constant side) and
        ``n_tokens [N]`` long, the number of pairs each ``rho_i`` used; both on ``sequences.device``.
    """
    if not (sequences.shape == attention_mask.shape == completion_token_mask.shape) or sequences.ndim != 2:
        raise ValueError(
            "sequences, attention_mask and completion_token_mask must all be [N, S], got "
            f"{tuple(sequences.shape)}, {tuple(attention_mask.shape)}, {tuple(completion_token_mask.shape)}"
        )
    n = sequences.shape[0]
    rho = torch.full((n,), float("nan"), dtype=torch.float64, device=sequences.device)
    n_tokens = torch.zeros(n, dtype=torch.long, device=sequences.device)
    for start in range(0, n, max(rows_per_chunk, 1)):
        rows = slice(start, min(start + rows_per_chunk, n))
        first = _trim_left(attention_mask[rows])
        ids, mask = sequences[rows, first:], attention_mask[rows, first:]
        tokens = completion_token_mask[rows, first:].bool()
        entropy, strength = score_tokens(model, ids, mask, tokens, config.strength)
        rho[rows], n_tokens[rows] = response_correlations(entropy, strength, tokens, config.correlation)
    return rho, n_tokens


def response_correlations(entropy: Tensor, strength: Tensor, tokens: Tensor, correlation: str) -> tuple[Tensor, Tensor]:
    """Per row: ``rho = corr(H, S)`` over its ``tokens`` where both are finite (float64, NaN when not
    computable), and the number of pairs (long). The one place a response's correlation is formed, whether
    its ``H`` and ``S`` came from a scoring pass or from the update's own forward."""
    correlate = batched_spearman if correlation == "spearman" else batched_pearson
    pairs = tokens.bool() & entropy.isfinite() & strength.isfinite()
    return correlate(entropy, strength, pairs).double(), pairs.sum(-1)


def inversion_bonus(
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
        coef: ``lambda`` (e.g. ``InversionRewardConfig.coef_at(step)``); 0 gives exact zeros.
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
