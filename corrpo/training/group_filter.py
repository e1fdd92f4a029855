"""Which GRPO groups carry a learning signal: the one test of "a group's rewards differ", and what it reads.

A group whose rewards are all equal has advantage 0 on every member (the reward minus its own mean), so it adds
nothing to the policy gradient. :func:`varied_groups` is that test, used twice: the logged share of such groups
(TRL's ``frac_reward_zero_std``, :func:`corrpo.training.objectives.zero_std_fraction`) and DAPO's dynamic sampling
(:mod:`corrpo.training.dynamic_sampling`), which drops them and samples more prompts in their place. It is verl's
``filter_groups`` rule (``recipe/dapo/dapo_ray_trainer.py``: keep a prompt whose metric has ``np.std(vals) > 0``)
stated exactly: values that are all equal are constant, where ``np.std`` of equal non-dyadic floats can round to
a few ulps above 0 (``np.std([0.1] * 3)`` is ``1.4e-17``).

:func:`filter_values` picks the per-completion values the filter reads (``rl.dynamic_sampling.metric``): the
weighted total of the task rewards (verl's ``seq_reward`` / ``score``) or one reward function's scores (verl's
``acc`` is corrpo's ``accuracy``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from corrpo.rewards.combine import RewardScores

TOTAL_REWARD = "reward"
"""``rl.dynamic_sampling.metric`` of the weighted total of the task rewards (the default)."""
TOTAL_REWARD_ALIASES = (TOTAL_REWARD, "seq_reward", "score")
"""verl's names of the same quantity: ``seq_reward`` (the summed token-level scores) and ``score`` (a
``compute_score`` dict's reward)."""
VERL_ACCURACY = ("acc", "accuracy")
"""verl's ``acc`` (the accuracy a ``compute_score`` reports) is corrpo's ``accuracy`` reward."""


def varied_groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N / group_size]`` bool: each group (``group_size`` consecutive values) holds at least two scored values
    that differ. NaN (unscored) values are left out: a group with fewer than two scored values is constant, as its
    advantages are all 0 (:func:`corrpo.training.objectives.group_advantages` leaves NaN rewards out of the baseline).
    """
    grouped = values.view(-1, group_size)
    scored = ~grouped.isnan()
    high = grouped.masked_fill(~scored, float("-inf")).max(dim=1).values
    low = grouped.masked_fill(~scored, float("inf")).min(dim=1).values
    return (high != low) & (scored.sum(dim=1) >= 2)


def resolve_metric(metric: str, reward_names: Iterable[str]) -> str:
    """The reward name ``metric`` reads (:data:`TOTAL_REWARD` for the total), or a ValueError naming
    ``rl.dynamic_sampling.metric`` and the choices."""
    names = list(reward_names)
    if metric in names:  # a reward's own name wins over an alias
        return metric
    if metric in TOTAL_REWARD_ALIASES:
        return TOTAL_REWARD
    if metric == VERL_ACCURACY[0] and VERL_ACCURACY[1] in names:
        return VERL_ACCURACY[1]
    if metric == "seq_final_reward":
        raise ValueError(
            "rl.dynamic_sampling.metric='seq_final_reward' is verl's reward after its in-reward KL penalty, which "
            "corrpo does not have (its KL is in the loss); use 'reward' (verl's seq_reward), the task rewards' total"
        )
    choices = ", ".join(repr(n) for n in [TOTAL_REWARD, *names])
    raise ValueError(
        f"rl.dynamic_sampling.metric={metric!r} is neither the total reward nor the name of one of rl.rewards; "
        f"choose one of {choices} (verl's 'seq_reward' and 'score' are 'reward')"
    )


def filter_values(scores: RewardScores, metric: str, skip_unscorable: bool = True) -> torch.Tensor:
    """``[N]`` values the filter reads: the weighted total of the task rewards (NaN where no reward scored a sample,
    with ``skip_unscorable``: the rewards the advantages see) for :data:`TOTAL_REWARD`, else reward ``metric``'s own
    scores (NaN where unscored). ``metric`` is a :func:`resolve_metric` result."""
    if metric != TOTAL_REWARD:
        return scores.per_function[metric]
    if skip_unscorable and scores.unscorable is not None:
        return scores.total.masked_fill(scores.unscorable, float("nan"))
    return scores.total
