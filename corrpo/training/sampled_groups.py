"""Scored GRPO groups as one object: the rollout, the reward inputs and the scores of ``B`` prompts' ``G`` samples.

An RL step samples and scores a batch of prompts, then computes advantages and updates on it. Dynamic sampling
(:mod:`corrpo.training.dynamic_sampling`) does the first part several times and keeps only some groups, so it needs
two operations on a scored batch, here: :meth:`SampledGroups.take` (some of its groups, rows kept prompt-major) and
:func:`join_groups` (several such batches as one). Rounds sample prompts of different token widths, so joining
left-pads the narrower prompts and right-pads the narrower completions (masked out: positions come from the
attention mask, so padding changes no log-prob).

The per-function fault counts (``n_failed``, ``n_unscored``) describe scoring calls, not rows: a selection keeps
its call's counts and a join sums them, so the logged ``rewards/<f>/failed`` counts every sample the step scored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from corrpo.generation.rollout import Rollout, concat_rollouts
from corrpo.rewards.call import RewardInputs, RewardLog
from corrpo.rewards.combine import RewardScores


@dataclass
class SampledGroups:
    """``N = B * G`` scored samples of ``B`` prompts, prompt-major (row ``b * G + g``)."""

    rollout: Rollout
    inputs: RewardInputs
    """What the rewards were called with (prompts, completions, columns, ids; ``log`` holds what they logged)."""
    scores: RewardScores
    group_size: int

    @property
    def n_groups(self) -> int:
        return len(self.inputs) // self.group_size

    def take(self, groups: list[int]) -> SampledGroups:
        """The groups at ``groups`` (in that order), every row of each."""
        G = self.group_size
        rows = [g * G + j for g in groups for j in range(G)]
        index = torch.tensor(rows, dtype=torch.long)
        return SampledGroups(
            _take_rollout(self.rollout, index), _take_inputs(self.inputs, rows), _take_scores(self.scores, index), G
        )


def join_groups(parts: list[SampledGroups], pad_token_id: int) -> SampledGroups:
    """One batch of every group of ``parts``, in order (the first part's groups first)."""
    if len(parts) == 1:
        return parts[0]
    return SampledGroups(
        _join_rollouts([p.rollout for p in parts], pad_token_id),
        _join_inputs([p.inputs for p in parts]),
        _join_scores([p.scores for p in parts]),
        parts[0].group_size,
    )


# ------------------------------------------------------------------------------------------------ rollouts
def _take_rollout(rollout: Rollout, index: torch.Tensor) -> Rollout:
    index = index.to(rollout.sequences.device)
    return Rollout(
        sequences=rollout.sequences[index],
        attention_mask=rollout.attention_mask[index],
        completion_mask=rollout.completion_mask[index],
        truncated=rollout.truncated[index],
        prompt_length=rollout.prompt_length,
    )


def _left_pad_prompts(rollout: Rollout, width: int, pad_token_id: int) -> Rollout:
    """``rollout`` with its prompts left-padded to ``width`` columns (mask 0 on the new columns)."""
    extra = width - rollout.prompt_length
    if extra == 0:
        return rollout
    return replace(
        rollout,
        sequences=F.pad(rollout.sequences, (extra, 0), value=pad_token_id),
        attention_mask=F.pad(rollout.attention_mask, (extra, 0), value=0),
        prompt_length=width,
    )


def _join_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """The rows of every rollout in order; an empty one (a round that kept no group) adds no padding."""
    rollouts = [r for r in rollouts if r.sequences.shape[0]] or rollouts[:1]
    width = max(r.prompt_length for r in rollouts)
    return concat_rollouts([_left_pad_prompts(r, width, pad_token_id) for r in rollouts], pad_token_id)


# --------------------------------------------------------------------------------------- reward inputs
def _take_log(log: RewardLog | None, rows: list[int], n: int) -> RewardLog | None:
    if log is None:
        return None
    extra = {name: [values[i] for i in rows] for name, values in log.extra.items() if len(values) == n}
    return RewardLog(metrics=dict(log.metrics), extra=extra)


def _take_inputs(inputs: RewardInputs, rows: list[int]) -> RewardInputs:
    return RewardInputs(
        prompts=[inputs.prompts[i] for i in rows],
        completions=[inputs.completions[i] for i in rows],
        columns={name: [values[i] for i in rows] for name, values in inputs.columns.items()},
        completion_ids=[inputs.completion_ids[i] for i in rows] if inputs.completion_ids is not None else None,
        trainer_state=inputs.trainer_state,
        log=_take_log(inputs.log, rows, len(inputs)),
    )


def _join_logs(parts: list[RewardInputs]) -> RewardLog | None:
    """The rounds' reward logs as one: a metric a later round logged again keeps the later value; a per-completion
    column every round logged, concatenated (one a round lacks would not line up with the rows: dropped)."""
    logs = [p.log for p in parts]
    if all(log is None for log in logs):
        return None
    logs = [log if log is not None else RewardLog() for log in logs]
    metrics = {name: value for log in logs for name, value in log.metrics.items()}
    common = set.intersection(*(set(log.extra) for log in logs))
    extra = {name: [v for log in logs for v in log.extra[name]] for name in logs[0].extra if name in common}
    return RewardLog(metrics=metrics, extra=extra)


def _join_inputs(parts: list[RewardInputs]) -> RewardInputs:
    """The inputs of every round in order; a dataset column a round lacks is None on its rows (as
    :func:`corrpo.data.datamodule.dataset_columns` fills a row that lacks a column)."""
    names = list(dict.fromkeys(name for p in parts for name in p.columns))
    columns = {name: [v for p in parts for v in p.columns.get(name, [None] * len(p))] for name in names}
    ids = None
    if all(p.completion_ids is not None for p in parts):
        ids = [row for p in parts for row in p.completion_ids]
    return RewardInputs(
        prompts=[x for p in parts for x in p.prompts],
        completions=[x for p in parts for x in p.completions],
        columns=columns,
        completion_ids=ids,
        trainer_state=parts[0].trainer_state,
        log=_join_logs(parts),
    )


# ---------------------------------------------------------------------------------------------- scores
def _take_scores(scores: RewardScores, index: torch.Tensor) -> RewardScores:
    unscorable = scores.unscorable[index] if scores.unscorable is not None else None
    return RewardScores(
        per_function={name: values[index] for name, values in scores.per_function.items()},
        total=scores.total[index],
        n_failed=dict(scores.n_failed),
        n_unscored=dict(scores.n_unscored),
        unscorable=unscorable if unscorable is not None and unscorable.any() else None,
    )


def _summed(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for count in counts:
        for name, n in count.items():
            out[name] = out.get(name, 0) + n
    return out


def _join_scores(parts: list[RewardScores]) -> RewardScores:
    unscorable = [p.unscorable if p.unscorable is not None else torch.zeros_like(p.total, dtype=torch.bool)
                  for p in parts]  # fmt: skip
    joined = torch.cat(unscorable)
    return RewardScores(
        per_function={name: torch.cat([p.per_function[name] for p in parts]) for name in parts[0].per_function},
        total=torch.cat([p.total for p in parts]),
        n_failed=_summed([p.n_failed for p in parts]),
        n_unscored=_summed([p.n_unscored for p in parts]),
        unscorable=joined if joined.any() else None,
    )
