"""One optimizer update that never writes NaN into the weights: backward (of every micro-batch), guard, clip,
lr, step, check.

The losses of a step's micro-batches are backpropagated one after the other (their gradients accumulate; each
graph is freed by its own backward), then ONE finiteness check decides: the summed loss must be finite on every
rank (the ranks agree, so they all skip or all step) and so must the gradient norm. A skipped update zeroes the
gradients and never calls the optimizer: the weights and the optimizer state are untouched. The caller counts
and logs skips (:class:`SkipStreak` stops a run whose updates keep being skipped).

Finite or stopped: a finite loss and gradient can still give non-finite weights (``lr`` huge, an overflow in the
step), and weights made non-finite outside an update (in place, by a hook) make every later update skip. So the
trained parameters are checked after each applied update (one fused norm per dtype,
:func:`corrpo.models.finite.nonfinite_tensors`) and all weights after a skip: either case raises
:class:`corrpo.models.finite.NonFiniteWeightsError` naming the tensors, so the run stops before anything
non-finite is checkpointed or exported (restoring would need a copy of the weights at every step; the last
checkpoint is the state to go back to). :func:`adamw` is the optimizer both phases use.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from corrpo.models.finite import NonFiniteWeightsError, describe, nonfinite_tensors
from corrpo.training.collectives import SINGLE_PROCESS, Collectives

AFTER_SKIP = "the update was skipped (non-finite loss or gradient) because"


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
        require_finite_parameters(model, collectives, AFTER_SKIP)
        where = "" if collectives.world_size == 1 else f" on rank {collectives.rank} or another"
        return UpdateOutcome(applied=False, skipped=f"non-finite loss {total.item()}{where}", loss=total)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP2 shards: the norm over every rank's shard, the same on all
        grad_norm = grad_norm.full_tensor()
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        require_finite_parameters(model, collectives, AFTER_SKIP)
        skipped = f"non-finite gradient norm {grad_norm.item()}"
        return UpdateOutcome(applied=False, grad_norm=grad_norm, skipped=skipped, loss=total)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    bad = nonfinite_tensors((name, p) for name, p in model.named_parameters() if p.requires_grad)
    if not collectives.all_true(not bad):
        raise NonFiniteWeightsError(
            f"the update at lr={lr:g} made {len(bad) or 'some'} weight tensor(s) non-finite "
            f"({describe(bad) if bad else 'on another rank'}) although its loss ({total.item():.4g}) and gradient "
            f"norm ({grad_norm.item():.4g}, clipped to max_grad_norm={max_grad_norm:g}) were finite: the step "
            "overflowed. Likely cause: the learning rate (sft.lr / rl.lr, its warm-up and min_lr_ratio) or "
            "weight_decay is too large. The run stops here; nothing after this update is checkpointed or exported"
        )
    return UpdateOutcome(applied=True, grad_norm=grad_norm, lr=lr, loss=total)


def require_finite_parameters(model: nn.Module, collectives: Collectives, when: str) -> None:
    """Stop, naming the tensors, when the weights of ``model`` hold NaN/inf ``when`` (after a skipped update, as an
    RL step starts): a non-finite model makes every later update skip (its loss is non-finite) and fails far from
    the cause (an eigen-solver in the CorR-PO term's strengths). Applied updates are checked as they are made, so
    such weights were changed in place (a callback, a hook, a reward holding the model) or loaded that way."""
    bad = nonfinite_tensors(model.named_parameters())
    if not collectives.all_true(not bad):
        raise NonFiniteWeightsError(
            f"{when} the weights already hold NaN or inf ({describe(bad) if bad else 'on another rank'}): every "
            "update from here would be skipped. Applied updates are checked, so something changed the weights in "
            "place (a callback, a hook, a reward holding the model) or the policy was loaded that way. The run "
            "stops; nothing non-finite is checkpointed or exported"
        )


class SkipStreak:
    """Skipped updates in a row: each is warned; ``max_consecutive_skipped_updates`` of them stop the run.

    One skip (a NaN loss from one bad batch) is recoverable; a streak means every update is skipped and the run
    would only burn its remaining steps, so it stops with an error naming the likely causes."""

    def __init__(self) -> None:
        self.count = 0

    def record(self, update: UpdateOutcome, config, section: str, step: int) -> int:
        """Count ``update`` (an applied one ends the streak); 1 when it was skipped, else 0 (the caller's total).
        Raises :class:`SkippedUpdatesError` when the streak reaches ``config.max_consecutive_skipped_updates`` (the
        phase's :class:`corrpo.training.config.OptimConfig`; 0 = never)."""
        limit = config.max_consecutive_skipped_updates
        if update.applied:
            self.count = 0
            return 0
        self.count += 1
        warnings.warn(f"update skipped at global step {step}: {update.skipped}", stacklevel=4)
        if limit and self.count >= limit:
            raise SkippedUpdatesError(
                f"{self.count} updates in a row were skipped (the last at global step {step}: {update.skipped}); "
                f"{section}.max_consecutive_skipped_updates={limit} stops the run. Likely causes: the learning rate "
                f"({section}.lr) diverged the loss; a reward returning NaN/inf or huge values (rl.rewards, "
                f"rl.reward_weights); a bf16/fp16 overflow (model.dtype). Resume from the last checkpoint after the fix"
            )
        return 1


class SkippedUpdatesError(RuntimeError):
    """Too many updates in a row were skipped: the run stops instead of silently training nothing."""
