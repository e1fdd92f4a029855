"""reasoning-gym tasks as RL prompt sources: ``data.rl_source: "reasoning_gym:gsm_symbolic"``.

Why: reasoning-gym generates verifiable problems procedurally (``gsm_symbolic``, ``basic_arithmetic``,
``chain_sum`` and every other name its ``create_dataset`` accepts), so RL prompts need no download. It is an
optional extra: ``pip install "corrpo[reasoning-gym]"``.

Each record is ``{"prompt": question, "answer": gold}`` with the gold answer as a string, which the accuracy
reward (math-verify) parses. Train and test never share a problem: each split is generated from its own
seed (derived from ``seed`` and the split), and because a small task can generate the same question from
two seeds, a question belongs to exactly one split by a hash of its text (:func:`corrpo.data.arithmetic.
split_of`: "test" keeps the questions of its test bucket, "train" all the others).
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Any

from corrpo.data.arithmetic import split_of

PREFIX = "reasoning_gym:"
SPLITS: tuple[str, ...] = ("train", "test")
INSTALL_HINT = 'pip install "corrpo[reasoning-gym]"'
_DRAWS_PER_RECORD = {"train": 2, "test": 20}
"""Problems generated per record kept, at most: "test" keeps ~10% of the questions, "train" ~90%."""


def task_name(source: str | None) -> str | None:
    """``"reasoning_gym:chain_sum"`` -> ``"chain_sum"``; any other source -> None."""
    if not isinstance(source, str) or not source.startswith(PREFIX):
        return None
    name = source[len(PREFIX) :].strip()
    if not name:
        raise ValueError(f"data source {source!r}: name the reasoning-gym task, e.g. 'reasoning_gym:chain_sum'")
    return name


def _reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as err:
        raise ImportError(f"reasoning-gym task sources need the optional extra: {INSTALL_HINT}") from err
    return reasoning_gym


def split_seed(seed: int, split: str) -> int:
    """The generator seed of one split: far apart for train and test (reasoning-gym seeds item ``i`` with
    ``seed + i``, so nearby seeds would share items)."""
    digest = hashlib.sha256(f"corrpo-reasoning-gym-{seed}-{split}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _gold(value: Any) -> str | None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    return value if isinstance(value, str) and value.strip() else None


def reasoning_gym_records(name: str, n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """``n`` problems of the reasoning-gym task ``name`` for ``split`` (``"train"`` or ``"test"``).

    Deterministic in ``(name, seed, split)``; a larger ``n`` extends a smaller one.

    Raises:
        ImportError: reasoning-gym is not installed (the message names the extra).
        ValueError: unknown task or split, a problem without a usable answer, or too few problems.
    """
    if split not in SPLITS:
        raise ValueError(f"reasoning-gym split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    reasoning_gym = _reasoning_gym()
    draws = _DRAWS_PER_RECORD[split] * n + 100
    try:
        dataset = reasoning_gym.create_dataset(name, size=draws, seed=split_seed(seed, split))
    except ValueError as err:
        raise ValueError(f"{PREFIX}{name}: {err}") from err
    records: list[dict[str, str]] = []
    for index in range(draws):
        if len(records) == n:
            break
        entry = dataset[index]
        prompt, gold = entry.get("question"), _gold(entry.get("answer"))
        if not isinstance(prompt, str) or not prompt.strip() or gold is None:
            raise ValueError(f"{PREFIX}{name}: problem {index} has no usable question and answer: {entry!r:.120}")
        if (split_of(prompt) == "test") == (split == "test"):
            records.append({"prompt": prompt, "answer": gold})
    if len(records) < n:
        raise ValueError(
            f"{PREFIX}{name}: only {len(records)} of {n} {split!r} problems in {draws} draws; the task generates "
            "too few different questions (ask for fewer: data.n_train / data.n_test)"
        )
    return records
