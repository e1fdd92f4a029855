"""One optimizer update that never writes NaN into the weights: backward, guard, clip, lr, step.

A non-finite loss (on any rank: the ranks agree first, since a rank that skipped the backward alone would leave
the others waiting in the gradient all-reduce) or a non-finite gradient norm skips the update and says why;
the weights and the optimizer state are then untouched. The caller counts and logs skips.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from corrpo.training.collectives import SINGLE_PROCESS, Collectives


@dataclass
class UpdateOutcome:
    """What one update did."""

    applied: bool
    """False when it was skipped (see ``skipped``)."""
    grad_norm: torch.Tensor | None = None
    """Total gradient norm before clipping (None when skipped before the backward)."""
    lr: float | None = None
    """The learning rate the step used."""
    skipped: str | None = None
    """Why the update was skipped, for the warning."""


def apply_update(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    lr: float,
    max_grad_norm: float,
    collectives: Collectives = SINGLE_PROCESS,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> UpdateOutcome:
    """Backward ``loss``, clip the gradient norm of ``model`` to ``max_grad_norm`` (0 = no clip), step at ``lr``.

    ``backward`` is Lightning's ``manual_backward`` inside a Trainer (precision plugins, DDP hooks) and plain
    ``Tensor.backward`` outside one.
    """
    finite = collectives.all_true(bool(torch.isfinite(loss)))
    if not finite:
        where = "" if collectives.world_size == 1 else f" on rank {collectives.rank} or another"
        return UpdateOutcome(applied=False, skipped=f"non-finite loss {loss.item()}{where}")
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return UpdateOutcome(applied=False, grad_norm=grad_norm, skipped=f"non-finite gradient norm {grad_norm.item()}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateOutcome(applied=True, grad_norm=grad_norm, lr=lr)
