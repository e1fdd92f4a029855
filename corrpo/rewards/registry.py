"""The reward functions a config names by string: the registry (``accuracy``, ``format``) and import paths.

``rl.rewards`` entries that are strings resolve here (``pkg.module:function`` or ``pkg.module.function``), so user
rewards need no registration; the mapping form (factories, verl functions, reward models) is
:mod:`corrpo.rewards.spec`, which resolves its ``function`` here too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.call import RewardFn
from corrpo.rewards.format import format_reward

REWARD_REGISTRY: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def resolve_reward(name: str) -> Callable:
    """The callable a config names: a registry name, ``pkg.module:function`` or ``pkg.module.function``.

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
