"""Score a rollout batch with several reward functions and combine them, never losing a sample.

Each reward function has TRL's signature ``fn(prompts, completions, answer, **kwargs) -> list[float|None]``.
``None`` means "this function cannot score this sample" (TRL: NaN): the total is the weighted sum over
the functions that did score it, and 0 when none did. A function that raises on the batch is retried
sample by sample; a sample on which it still raises scores 0 and is counted in ``n_failed`` (logged as
``rewards/<name>/failed``) so that one bad completion never kills a run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

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


def _call_safely(name: str, fn: RewardFn, prompts, completions, answers, kwargs) -> tuple[list[float], int]:
    try:
        values = fn(list(prompts), list(completions), answer=list(answers), **kwargs)
        if len(values) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} samples")
        return [_as_float(v, name, i) for i, v in enumerate(values)], 0
    except Exception as batch_error:  # noqa: BLE001 - retried per sample below, then counted
        scores, failed = [], 0
        for i in range(len(completions)):
            try:
                value = fn([prompts[i]], [completions[i]], answer=[answers[i]], **kwargs)[0]
                scores.append(_as_float(value, name, i))
            except Exception as err:  # noqa: BLE001 - one bad sample must not stop training
                failed += 1
                scores.append(0.0)
                warnings.warn(f"reward {name!r} raised on sample {i} ({err!r}); scored 0", stacklevel=2)
        if failed == 0:
            warnings.warn(f"reward {name!r} raised on the batch ({batch_error!r}) but not per sample", stacklevel=2)
        return scores, failed


def score_completions(
    reward_fns: dict[str, RewardFn],
    weights: Sequence[float],
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str],
    **kwargs,
) -> RewardScores:
    """Run every reward function and combine: ``total_i = sum_k w_k * r_k,i`` over finite ``r_k,i``."""
    if len(weights) != len(reward_fns):
        raise ValueError(f"rl.reward_weights has {len(weights)} entries for {len(reward_fns)} rewards")
    per_function, n_failed = {}, {}
    total = torch.zeros(len(completions), dtype=torch.float32)
    for (name, fn), weight in zip(reward_fns.items(), weights, strict=True):
        scores, failed = _call_safely(name, fn, prompts, completions, answers, kwargs)
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
) -> list[dict]:
    """One row per completion (prompt, completion, each reward part, total reward, advantage, rho_i).

    The dashboard's completions table and the tests read these; NaN (unscored, or rho of a too-short or
    constant response) is kept as NaN rather than dropped, so every sampled completion has its row.
    """
    rewards, advantages = rewards.detach().float().cpu(), advantages.detach().float().cpu()
    rho = rho.detach().float().cpu() if rho is not None else None
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        row = {"step": step, "prompt": prompt, "completion": completion}
        row.update({f"reward/{name}": float(values[i]) for name, values in scores.per_function.items()})
        row.update({"reward": float(rewards[i]), "advantage": float(advantages[i])})
        row["rho"] = float(rho[i]) if rho is not None else math.nan
        rows.append(row)
    return rows
