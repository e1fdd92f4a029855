"""One optimizer update that never writes NaN into the weights: backward (of every micro-batch), guard, clip,
lr, step.

The losses of a step's micro-batches are backpropagated one after the other (their gradients accumulate; each
graph is freed by its own backward), then ONE finiteness check decides: the summed loss must be finite on every
rank (the ranks agree, so they all skip or all step) and so must the gradient norm. A skipped update zeroes the
gradients and never calls the optimizer: the weights and the optimizer state are untouched. The caller counts
and logs skips. :func:`adamw` is the optimizer both phases use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from corrpo.training.collectives import SINGLE_PROCESS, Collectives


@dataclass
class UpdateOutcome:
    """What one update did."""

    applied: bool
    """False when it was skipped (see ``skipped``)."""
    grad_norm: torch.Tensor | None = None
    """Total gradient norm before clipping (None when the loss was non-finite)."""
    lr: float | None = None
    """The learning rate the step used."""
    skipped: str | None = None
    """Why the update was skipped, for the warning."""
    loss: torch.Tensor | None = None
    """The loss of the update: the sum of its micro-batches' losses (detached)."""


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch has one for the parameters' device (CPU and CUDA in torch >= 2.4):
    the default ``foreach`` implementation keeps a temporary copy of the moments (about 1.4 bytes a parameter more
    at the step's peak, measured in ``benchmarks/memory.py``)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def apply_update(
    losses: torch.Tensor | Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    lr: float,
    max_grad_norm: float,
    collectives: Collectives = SINGLE_PROCESS,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> UpdateOutcome:
    """Backward ``losses`` (one loss, or one per micro-batch, e.g. a generator that runs each micro-batch's forward
    when asked), clip the gradient norm of ``model`` to ``max_grad_norm`` (0 = no clip), step at ``lr``.

    ``backward`` is Lightning's ``manual_backward`` inside a Trainer (precision plugins, DDP hooks) and plain
    ``Tensor.backward`` outside one. Every rank runs the same number of backwards (DDP all-reduces in each).
    """
    optimizer.zero_grad(set_to_none=True)
    total = None
    for loss in [losses] if isinstance(losses, torch.Tensor) else losses:
        backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    if total is None:
        raise ValueError("apply_update: no loss to backpropagate")
    finite = collectives.all_true(bool(torch.isfinite(total)))
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        where = "" if collectives.world_size == 1 else f" on rank {collectives.rank} or another"
        return UpdateOutcome(applied=False, skipped=f"non-finite loss {total.item()}{where}", loss=total)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP2 shards: the norm over every rank's shard, the same on all
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        skipped = f"non-finite gradient norm {grad_norm.item()}"
        return UpdateOutcome(applied=False, grad_norm=grad_norm, skipped=skipped, loss=total)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateOutcome(applied=True, grad_norm=grad_norm, lr=lr, loss=total)
