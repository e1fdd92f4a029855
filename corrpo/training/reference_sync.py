"""Reference-model sync (TR-DPO, Gorbatovski et al. 2024; TRL's ``sync_ref_model``): every ``tau`` RL optimizer
updates the KL reference moves toward the policy, ``pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref``.

A frozen reference holds the policy near where RL started for the whole run; a synced one lets the KL constrain
each stretch of training against a recent policy instead. TRL's ``SyncRefModelCallback`` mixes after the optimizer
step whose ``global_step`` is a multiple of ``ref_model_sync_steps``; corrpo counts RL optimizer updates the same way
(``num_iterations`` per rollout batch), so the next rollout batch's reference log-probs see the mixed weights.
"""

from __future__ import annotations

import torch
from torch import nn


def mix_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """``ref <- (1 - alpha) * ref + alpha * policy``, parameter by parameter in place (TRL's arithmetic:
    ``ref.mul_(1 - alpha).add_(policy, alpha=alpha)``). The two modules must have the same parameters in the same
    order (the reference is built like the policy, LoRA and FSDP2 sharding included)."""
    with torch.no_grad():
        for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
            ref_param.mul_(1.0 - alpha).add_(param.detach(), alpha=alpha)


def sync_due(updates_done: int, every: int) -> bool:
    """Whether the reference mixes after RL optimizer update number ``updates_done`` (1-based, as TRL's
    ``global_step`` after the step): every ``every`` updates."""
    return updates_done > 0 and updates_done % every == 0
