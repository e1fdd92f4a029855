"""The :class:`RewardInputs` of a scoring call from plain lists, as the RL step builds them (``answer`` a column)."""

from __future__ import annotations

from corrpo.rewards.call import RewardInputs


def reward_inputs(prompts, completions, answers=None, columns=None, **fields) -> RewardInputs:
    """``prompts``, ``completions`` and (optionally) the ``answer`` column plus other ``columns``; ``fields`` are the
    other :class:`RewardInputs` fields (``completion_ids``, ``trainer_state``, ``log``)."""
    columns = {name: list(values) for name, values in (columns or {}).items()}
    if answers is not None:
        columns["answer"] = list(answers)
    return RewardInputs(prompts=list(prompts), completions=list(completions), columns=columns, **fields)
