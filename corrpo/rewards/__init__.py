"""Reward functions with TRL's signature and a registry to name them from a config.

Every reward is ``fn(prompts: list[str], completions: list[str], answer: list[str], **kwargs) ->
list[float | None]``, with ``None`` where a sample cannot be scored (e.g. an unparseable gold answer).
Configs name a reward by registry name (``accuracy``, ``format``) or by import path
(``package.module:function`` or ``package.module.function``), so user rewards need no registration.

The calling convention (``call``: TRL's keywords, async allowed), the weighted combination with its fault counts
and failure monitor (``combine``), math-verify accuracy (``accuracy``) with its time bound (``deadline``), the
answer extraction (``answer``) and the format reward (``format``). Imports nothing else of corrpo: every room above
may call a reward.
"""

from __future__ import annotations

import importlib

from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.answer import extract_answer
from corrpo.rewards.call import RewardFn
from corrpo.rewards.format import format_reward

REWARD_REGISTRY: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def resolve_reward(name: str) -> RewardFn:
    """The reward a config names: a registry name, ``pkg.module:function`` or ``pkg.module.function``.

    Raises:
        ValueError: neither registered nor an importable callable (the message lists the registry).
    """
    if name in REWARD_REGISTRY:
        return REWARD_REGISTRY[name]
    known = f"registered rewards: {sorted(REWARD_REGISTRY)}, or an import path 'package.module:function'"
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        raise ValueError(f"unknown reward {name!r}; {known}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import reward {name!r} ({err}); {known}") from err
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable; {known}")
    return fn


def reward_name(name: str) -> str:
    """The short name a reward is logged under: ``rewards/<short>/mean`` (``pkg.mod:fn`` -> ``fn``)."""
    return name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def reward_functions(names: list[str]) -> dict[str, RewardFn]:
    """``rl.rewards`` resolved, keyed by short name; two rewards with one short name are an error, since
    their scores and logs would overwrite each other."""
    functions: dict[str, RewardFn] = {}
    for name in names:
        short = reward_name(name)
        if short in functions:
            raise ValueError(f"rl.rewards: two rewards are named {short!r} ({names}); wrap one under another name")
        functions[short] = resolve_reward(name)
    return functions


__all__ = [
    "REWARD_REGISTRY",
    "RewardFn",
    "accuracy_reward",
    "extract_answer",
    "format_reward",
    "resolve_reward",
    "reward_functions",
    "reward_name",
]
