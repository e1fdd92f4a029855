"""The contracts between a training module, its data module and the callbacks, each checked once at ``setup``.

Callbacks used to read a dozen module attributes by duck typing, and the module and the tracker read the data
module through ``getattr(..., default)`` and ``hasattr``, so a renamed attribute silently switched a feature off.
Now each reader calls :func:`require_host` (the module: :class:`TrainingHost`) or :func:`require_held_out_data`
(the data module: :class:`HeldOutData`) once, at ``setup``: a gap is an error naming what is missing, before any
step runs. :class:`corrpo.module.CorrPOModule` and :class:`corrpo.data.datamodule.ReasoningDataModule` are the
implementations.

:func:`require_even_split` is the one check that a count splits evenly across the processes (batch sizes, the test
and probe sets, eval files): here, the lowest room the module, the data module and the callbacks all import.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from corrpo.generation.rollout import Rollout
from corrpo.models.batching import ChatPrompt, PromptFormat
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
    """Whether text prompts are wrapped with the tokenizer's chat template."""
    prompt_format: PromptFormat
    """How prompts become the model's text (chat template, system prompt, template kwargs): the probes use it."""
    last_completions: list[dict]
    """One row per completion of this rank's last RL batch (prompt, completion, rewards, advantage, rho)."""
    eval_history: list[dict]
    """Test-accuracy measurements so far: ``{when, step, accuracy, scored}``."""
    skipped_updates: int
    """Updates skipped for a non-finite loss or gradient."""
    device: torch.device

    def generate_rollout(self, prompts: list[ChatPrompt], num_generations: int, greedy: bool = False) -> Rollout:
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


@runtime_checkable
class HeldOutData(Protocol):
    """What the module (evaluation, results.json) and the inversion tracker read from the data module."""

    seed: int
    """Seed of the batch order and of held-out splits (results.json ``seeds.data``)."""
    fields: dict[str, dict[str, str] | None]
    """Canonical field -> column name, by kind (``sft``, ``rl``): the eval files are read with the ``rl`` one."""

    def test_records(self) -> list[dict]:
        """Held-out (prompt, answer) records for accuracy, all ranks' together."""
        ...

    def probe_records(self) -> list[dict]:
        """Held-out (prompt, completion) traces for the inversion probes, all ranks' together."""
        ...

    def rl_records(self) -> list[dict]:
        """The RL prompt records (prompt, answer, dataset columns): the module dry-runs the rewards on a few of them
        at fit start (:mod:`corrpo.rewards.dry_run`)."""
        ...


HELD_OUT_ATTRIBUTES = tuple(HeldOutData.__annotations__) + ("test_records", "probe_records", "rl_records")


def require_held_out_data(datamodule: object, who: str) -> HeldOutData:
    """``datamodule`` if it offers every part of :class:`HeldOutData`, else a TypeError naming ``who`` and the
    gaps (a Trainer without a data module lacks them all)."""
    missing = [name for name in HELD_OUT_ATTRIBUTES if not hasattr(datamodule, name)]
    if missing:
        raise TypeError(
            f"{who} needs a data module implementing corrpo.training.host.HeldOutData (such as "
            f"corrpo.data.datamodule.ReasoningDataModule); {type(datamodule).__name__} lacks {', '.join(missing)}"
        )
    return datamodule


def require_even_split(key: str, n: int, world_size: int, why: str = "") -> None:
    """A ValueError ``<key>=<n> must be divisible by the number of processes (<world_size>) <why>`` unless ``n``
    splits evenly: unequal shares would weight ranks unequally, or (FSDP2) make ranks run different collectives."""
    if n % world_size:
        reason = f" {why}" if why else ""
        raise ValueError(f"{key}={n} must be divisible by the number of processes ({world_size}){reason}")


def seed_or_global(seed: int | None) -> int:
    """``seed``, or when it is None the ``seed_everything`` seed (Lightning's ``PL_GLOBAL_SEED``; 0 when nothing was
    seeded): how the module's, the data module's and the task's unset seeds follow the global one (the CLI writes the
    value into the config too, :func:`corrpo.cli.fill_unset_seeds`)."""
    return seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
