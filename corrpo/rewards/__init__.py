"""Reward functions with TRL's signature, and the ``rl.rewards`` entries that name or build them.

Every reward is ``fn(prompts: list[str], completions: list[str], answer: list[str], **kwargs) ->
list[float | None]``, with ``None`` where a sample cannot be scored (e.g. an unparseable gold answer).
Configs name a reward by registry name (``accuracy``, ``format``) or by import path
(``package.module:function`` or ``package.module.function``), so user rewards need no registration; or by a mapping
(``spec``): a factory with ``kwargs``, a verl ``compute_score`` (``verl``), a sequence-classifier reward model
(``reward_model``).

The calling convention (``call``: TRL's keywords, async allowed), the weighted combination with its fault counts
and failure monitor (``combine``), the start-up dry run of every reward (``dry_run``), math-verify accuracy
(``accuracy``) with its time bound (``deadline``), the answer extraction (``answer``) and the format reward
(``format``). Imports nothing else of corrpo: every room above may call a reward.
"""

from __future__ import annotations

from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.answer import extract_answer
from corrpo.rewards.call import RewardFn
from corrpo.rewards.format import format_reward
from corrpo.rewards.registry import REWARD_REGISTRY, resolve_reward, reward_name
from corrpo.rewards.spec import RewardConfigError, RewardSpec, parse_reward_spec, reward_functions

__all__ = [
    "REWARD_REGISTRY",
    "RewardFn",
    "RewardSpec",
    "accuracy_reward",
    "extract_answer",
    "format_reward",
    "parse_reward_spec",
    "resolve_reward",
    "reward_functions",
    "RewardConfigError",
    "reward_name",
]
