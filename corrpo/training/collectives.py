"""The cross-rank reductions a training step needs, behind one small object.

A step is plain code (:mod:`corrpo.training.grpo`, :mod:`corrpo.training.sft`); under DDP a few of its numbers
must span every rank (the global token count of a token-mean loss, the top-entropy threshold, a pooled mean,
whether every rank's loss is finite). :class:`Collectives` is the single-process version (every reduction is
the identity), so a unit test or a benchmark runs a step without a Trainer; :class:`LightningCollectives`
does the same through a Lightning strategy.
"""

from __future__ import annotations

import torch


class Collectives:
    """One process: world size 1, rank 0, every reduction the identity."""

    world_size: int = 1
    rank: int = 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over the ranks."""
        return value

    def sum_floats(self, *values: float, device: torch.device | str = "cpu") -> list[float]:
        """Each of ``values`` summed over the ranks, in float64."""
        return torch.tensor(values, dtype=torch.float64, device=device).tolist()

    def all_gather(self, value: torch.Tensor) -> torch.Tensor:
        """``[world_size, *value.shape]``: every rank's ``value`` stacked (all ranks must pass one shape)."""
        return value.unsqueeze(0)

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank."""
        return flag


SINGLE_PROCESS = Collectives()


class LightningCollectives(Collectives):
    """The reductions through a LightningModule's trainer strategy (DDP and friends)."""

    def __init__(self, module) -> None:
        self.module = module
        self.world_size = module.trainer.world_size
        self.rank = module.global_rank

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        return self.module.trainer.strategy.reduce(value, reduce_op="mean")

    def sum_floats(self, *values: float, device: torch.device | str = "cpu") -> list[float]:
        stats = torch.tensor(values, dtype=torch.float64, device=device)
        if self.world_size > 1:
            stats = self.module.trainer.strategy.reduce(stats, reduce_op="sum")
        return stats.tolist()

    def all_gather(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value.unsqueeze(0)
        return self.module.all_gather(value)

    def all_true(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        return self.module.trainer.strategy.reduce_boolean_decision(flag, all=True)
