r"""Clip-Cov and KL-Cov (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617).

Entropy falls under policy gradient in proportion to the covariance between a token's log-probability and its
advantage. Both methods pick the few tokens with the largest such covariance and restrain only those:

.. math::
    \operatorname{cov}_t = (A_t - \bar A)\,(\log\pi_t - \overline{\log\pi})

with means over the batch's loss tokens (detached: the covariance only selects, it is not differentiated).

* **Clip-Cov** (``rl.policy_loss: clip_cov``): among the tokens with ``lb < cov_t < ub`` that the ratio clip
  does not already stop, ``max(1, int(cov_ratio * n_tokens))`` are drawn at random and their gradient is
  removed (their loss term is multiplied by 0; the normaliser still counts them).
* **KL-Cov** (``rl.policy_loss: kl_cov``): the ``max(1, int(cov_ratio * n_tokens))`` tokens of largest
  covariance get ``kl_cov_coef * |log pi - log pi_old|`` added to their loss, and no token is ratio-clipped.
  With one update per rollout batch (``rl.num_iterations: 1``) ``log pi = log pi_old`` and the penalty has zero
  value and zero gradient: KL-Cov then is the plain unclipped policy gradient.

As in verl (``compute_policy_loss_clip_cov`` / ``_kl_cov``) the selection is per process: under DDP each rank
picks among its own tokens. Defaults are the paper's (``cov_ratio = 2e-4``, ``lb = 1``, ``ub = 5``,
``kl_cov_coef = 1``), tuned for batches of millions of tokens; a small batch gets the minimum of one token.
"""

from __future__ import annotations

import torch

POLICY_LOSSES = ("clip", "clip_cov", "kl_cov")


def token_covariance(advantages: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``cov_t = (A_t - mean A)(logp_t - mean logp)`` over the ``mask`` tokens, ``[N, L]`` float32, detached;
    ``-inf`` outside ``mask`` (never selected). ``advantages`` is per token ``[N, L]`` or per sequence ``[N]``."""
    mask = mask.bool()
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand_as(log_probs)
    adv, logp = adv.detach().float(), log_probs.detach().float()
    count = mask.sum().clamp(min=1)
    centred_adv = adv - (adv * mask).sum() / count
    centred_logp = logp - (logp * mask).sum() / count
    return torch.where(mask, centred_adv * centred_logp, torch.full_like(logp, -torch.inf))


def _count(cov_ratio: float, n_tokens: int) -> int:
    return max(int(cov_ratio * n_tokens), 1)


def clip_cov_tokens(
    cov: torch.Tensor,
    mask: torch.Tensor,
    stopped_by_clip: torch.Tensor,
    cov_ratio: float,
    lb: float,
    ub: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clip-Cov's tokens ``[N, L]`` bool: ``max(1, int(cov_ratio * n))`` drawn uniformly (without
    replacement) among the ``mask`` tokens with ``lb < cov < ub`` that ``stopped_by_clip`` does not mark."""
    mask = mask.bool()
    candidates = (mask & ~stopped_by_clip.bool() & (cov > lb) & (cov < ub)).flatten().nonzero().squeeze(1)
    chosen = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if candidates.numel():
        order = torch.randperm(candidates.numel(), generator=generator, device="cpu").to(candidates.device)
        chosen[candidates[order[: _count(cov_ratio, int(mask.sum()))]]] = True
    return chosen.view_as(mask)


def kl_cov_tokens(cov: torch.Tensor, mask: torch.Tensor, cov_ratio: float) -> torch.Tensor:
    """KL-Cov's tokens ``[N, L]`` bool: the ``max(1, int(cov_ratio * n))`` ``mask`` tokens of largest ``cov``."""
    mask = mask.bool()
    chosen = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    n_tokens = int(mask.sum())
    if n_tokens:
        top = torch.topk(cov.flatten(), min(_count(cov_ratio, n_tokens), n_tokens)).indices
        chosen[top] = True
    return chosen.view_as(mask) & mask
