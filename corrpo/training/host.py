"""The one interface callbacks and the data module read a training module through.

Callbacks used to read a dozen module attributes by duck typing, some through ``getattr(..., default)``, so a
renamed attribute silently switched a feature off. Now each of them calls :func:`require_host` once, at
``setup``: a module that lacks part of :class:`TrainingHost` is an error naming what is missing, before any
step runs. :class:`corrpo.module.CorrPOModule` is the implementation.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from corrpo.generation.rollout import Rollout
from corrpo.training.phases import PhaseSchedule


@runtime_checkable
class TrainingHost(Protocol):
    """What a corrpo callback may read from the module it is attached to."""

    schedule: PhaseSchedule
    """The SFT -> RL phases (the boundary predicate lives there, once)."""
    steps_done: int
    """Train batches finished; where a resumed run starts."""
    policy: nn.Module
    """The model being trained (a Hugging Face causal LM, possibly PEFT-wrapped)."""
    tokenizer: Any
    """Its tokenizer."""
    use_chat_template: bool
    """Whether prompts are wrapped with the tokenizer's chat template."""
    last_completions: list[dict]
    """One row per completion of this rank's last RL batch (prompt, completion, rewards, advantage, rho)."""
    eval_history: list[dict]
    """Test-accuracy measurements so far: ``{when, step, accuracy, scored}``."""
    skipped_updates: int
    """Updates skipped for a non-finite loss or gradient."""
    device: torch.device

    def generate_rollout(self, prompts: list[str], num_generations: int, greedy: bool = False) -> Rollout:
        """``num_generations`` completions per prompt from the current policy."""
        ...


HOST_ATTRIBUTES = tuple(TrainingHost.__annotations__) + ("generate_rollout",)


def require_host(module: object, who: str) -> TrainingHost:
    """``module`` if it offers every part of :class:`TrainingHost`, else a TypeError naming ``who`` and the gaps."""
    missing = [name for name in HOST_ATTRIBUTES if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"{who} needs a module implementing corrpo.training.host.TrainingHost (such as "
            f"corrpo.module.CorrPOModule); {type(module).__name__} lacks {', '.join(missing)}"
        )
    if not isinstance(module.schedule, PhaseSchedule):
        raise TypeError(f"{who}: {type(module).__name__}.schedule must be a PhaseSchedule")
    return module
