"""Score a rollout batch with several reward functions and combine them, never losing a sample.

Each reward function is called as TRL calls it, by keyword (:mod:`corrpo.rewards.call`): ``prompts``,
``completions``, ``completion_ids``, every dataset column (``answer``, ...), ``trainer_state``; it returns
``list[float|None]``.
``None`` means "this function cannot score this sample" (TRL: NaN): the total is the weighted sum over
the functions that did score it, and 0 when none did. A function that raises on the batch is retried
sample by sample; a sample on which it still raises scores 0 and is counted in ``n_failed`` (logged as
``rewards/<name>/failed``) so that one bad completion never kills a run. A function that raises on *every*
sample is broken (a wrong signature, a column the data lacks): that is an error naming it, not a step of zeros.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from corrpo.rewards.call import RewardInputs, RewardLog, StepInfo, call_reward

RewardFn = Callable[..., list]


@dataclass
class RewardScores:
    """Per-function scores (NaN where unscored) and their weighted total."""

    per_function: dict[str, torch.Tensor]
    """name -> ``[N]`` float tensor, NaN where the function returned None."""
    total: torch.Tensor
    """``[N]`` weighted sum of the finite per-function scores."""
    n_failed: dict[str, int] = field(default_factory=dict)
    """name -> samples on which the function raised (scored 0)."""


def _as_float(value: object, name: str, index: int) -> float:
    if value is None:
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"reward {name!r} returned {value!r} for sample {index}; expected a number or None") from err
    return out if math.isfinite(out) else math.nan


def _call_safely(name: str, fn: RewardFn, inputs: RewardInputs) -> tuple[list[float], int]:
    try:
        values = call_reward(fn, inputs)
        return [_as_float(v, name, i) for i, v in enumerate(values)], 0
    except Exception as batch_error:  # noqa: BLE001 - retried per sample below, then counted
        scores, failed, first_error = [], 0, None
        for i in range(len(inputs)):
            try:
                value = call_reward(fn, inputs.sample(i))[0]
                scores.append(_as_float(value, name, i))
            except Exception as err:  # noqa: BLE001 - one bad sample must not stop training
                failed += 1
                first_error = first_error or err
                scores.append(0.0)
                warnings.warn(f"reward {name!r} raised on sample {i} ({err!r}); scored 0", stacklevel=2)
        if failed and failed == len(inputs):  # a broken function (wrong signature, missing column), not a bad sample
            raise RuntimeError(
                f"reward {name!r} raised on every one of the {failed} samples of this step (first: {first_error!r}); "
                "rewards are called by keyword as in TRL: fn(prompts=, completions=, completion_ids=, <dataset "
                "columns>, trainer_state=, **kwargs)"
            ) from first_error
        if failed == 0:
            warnings.warn(f"reward {name!r} raised on the batch ({batch_error!r}) but not per sample", stacklevel=2)
        return scores, failed


def score_completions(
    reward_fns: dict[str, RewardFn],
    weights: Sequence[float],
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    columns: dict[str, Sequence] | None = None,
    completion_ids: list[list[int]] | None = None,
    trainer_state: StepInfo | None = None,
    log: RewardLog | None = None,
) -> RewardScores:
    """Run every reward function and combine: ``total_i = sum_k w_k * r_k,i`` over finite ``r_k,i``.

    Each function is called by keyword as TRL calls it (:mod:`corrpo.rewards.call`): ``prompts``,
    ``completions``, ``completion_ids``, every dataset column (``columns``, one value per completion; ``answers``
    is the ``answer`` column), ``trainer_state`` and the ``log_metric`` / ``log_extra`` hooks (into ``log``).
    """
    if len(weights) != len(reward_fns):
        raise ValueError(f"rl.reward_weights has {len(weights)} entries for {len(reward_fns)} rewards")
    columns = {name: list(values) for name, values in (columns or {}).items()}
    if answers is not None:
        columns["answer"] = list(answers)
    inputs = RewardInputs(
        prompts=list(prompts), completions=list(completions), columns=columns, completion_ids=completion_ids,
        trainer_state=trainer_state, log=log,
    )  # fmt: skip
    per_function, n_failed = {}, {}
    total = torch.zeros(len(completions), dtype=torch.float32)
    for (name, fn), weight in zip(reward_fns.items(), weights, strict=True):
        scores, failed = _call_safely(name, fn, inputs)
        values = torch.tensor(scores, dtype=torch.float32)
        per_function[name] = values
        n_failed[name] = failed
        total += weight * torch.nan_to_num(values, nan=0.0)
    return RewardScores(per_function=per_function, total=total, n_failed=n_failed)


def completion_rows(
    step: int,
    prompts: Sequence[str],
    completions: Sequence[str],
    scores: RewardScores,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    rho: torch.Tensor | None = None,
    *,
    answers: Sequence[str] | None = None,
    extra: dict[str, Sequence] | None = None,
) -> list[dict]:
    """One row per completion (prompt, gold answer, completion, each reward part, total reward, advantage, rho_i,
    then any ``extra`` column a reward added through ``log_extra``).

    The dashboard's completions table and the tests read these; NaN (unscored, or rho of a too-short or
    constant response) is kept as NaN rather than dropped, so every sampled completion has its row.
    """
    rewards, advantages = rewards.detach().float().cpu(), advantages.detach().float().cpu()
    rho = rho.detach().float().cpu() if rho is not None else None
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        row = {"step": step, "prompt": prompt}
        if answers is not None:
            row["answer"] = answers[i]
        row["completion"] = completion
        row.update({f"reward/{name}": float(values[i]) for name, values in scores.per_function.items()})
        row.update({"reward": float(rewards[i]), "advantage": float(advantages[i])})
        row["rho"] = float(rho[i]) if rho is not None else math.nan
        row.update({column: values[i] for column, values in (extra or {}).items() if len(values) == len(completions)})
        rows.append(row)
    return rows
