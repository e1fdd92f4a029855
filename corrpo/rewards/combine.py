"""Score a rollout batch with several reward functions and combine them, never losing a sample.

Each reward function is called as TRL calls it, by keyword (:mod:`corrpo.rewards.call`): ``prompts``,
``completions``, ``completion_ids``, every dataset column (``answer``, ...), ``trainer_state``; it returns
``list[float|None]``. ``None`` (or NaN) means "this function cannot score this sample" (TRL's convention): the
total is the weighted sum over the functions that did score it, and 0 when none did; such a sample is marked in
``RewardScores.unscorable``, which the advantages leave out as TRL does (``rl.unscorable_rewards``).

What is a fault, and what happens to it (each used to be masked):

- **Raising** on the batch: retried sample by sample; a sample on which it still raises scores 0 and is
  counted in ``n_failed`` (logged as ``rewards/<name>/failed``), with one warning per call, so one bad
  completion never kills a run. Raising on EVERY sample is a broken function (a wrong signature, a column the
  data lacks): a :class:`RewardError` naming it at once, not a step of zeros.
- **Returning +-inf**: counted in ``n_failed`` and scored 0 like a raise (it is a broken verifier, not an
  unscorable sample), and warned.
- **Returning the wrong number of values, a non-sequence, a mapping or a non-number**: a :class:`RewardError`
  naming the function and the counts, at once: a shape bug does not go away sample by sample, and retrying it
  used to pick element 0 of each call silently (and a dict used to be scored by its keys).
- **Exceeding ``rl.reward_timeout_s``** (one budget for the function's whole call on the step, retries
  included; SIGALRM, so enforced on the main thread): every sample of the call is counted failed and scored 0,
  with a warning naming the function, and no per-sample retry (which would wait the budget N times). A reward
  that keeps hanging is then stopped by the failure monitor below, after ``rl.reward_failure_patience`` steps.
- **Calling ``sys.exit``** (``SystemExit``): a :class:`RewardError` naming the function and the code: it used to
  end the whole run with the reward's exit code, 0 included, as if training had finished.
- **Scoring no sample at all** (all None / NaN): counted in ``n_unscored`` and warned; its mean is NaN,
  never a fake 0.
- **Failing on most samples, step after step**: :class:`RewardFailureMonitor` (``rl.max_reward_failure_share``
  over ``rl.reward_failure_patience`` consecutive RL steps) stops the run with a :class:`RewardError` naming
  the function, rather than training for hours on a reward that is really a constant 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import torch

from corrpo.rewards.call import RewardFn, RewardInputs, call_reward, completion_text, prompt_text
from corrpo.rewards.deadline import deadline


class RewardError(ValueError):
    """A reward function is broken, not a sample: the message names the function and what it did."""


class RewardTimedOut(BaseException):  # noqa: N818 - an interrupt, like KeyboardInterrupt
    """Raised inside a reward call whose ``rl.reward_timeout_s`` is spent (a ``BaseException``: the reward's own
    ``except Exception`` cannot swallow it)."""


@dataclass
class RewardScores:
    """Per-function scores (NaN where unscored) and their weighted total."""

    per_function: dict[str, torch.Tensor]
    """name -> ``[N]`` float tensor, NaN where the function returned None/NaN, 0 where it failed."""
    total: torch.Tensor
    """``[N]`` weighted sum of the finite per-function scores."""
    n_failed: dict[str, int] = field(default_factory=dict)
    """name -> samples on which the function raised or returned +-inf (scored 0)."""
    n_unscored: dict[str, int] = field(default_factory=dict)
    """name -> samples the function could not score (None / NaN)."""
    unscorable: torch.Tensor | None = None
    """``[N]`` bool: the samples NO reward function scored (each returned None / NaN): TRL leaves them out of the
    group baseline and gives them advantage 0 (``rl.unscorable_rewards``). None = every sample was scored."""


@dataclass
class _Call:
    """One function's scores over the batch and its fault counts."""

    scores: list[float]
    failed: int = 0
    infinite: int = 0


def _as_float(value: object, name: str, index: int) -> float:
    """A sample's score: NaN for None/NaN (unscored); +-inf stays infinite for the caller to count."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise RewardError(
            f"reward {name!r} returned {value!r:.60} for sample {index}; expected a number or None"
        ) from err


def _checked_values(name: str, values: object, expected: int) -> list:
    if isinstance(values, Mapping | AbstractSet):  # a dict's list() is its keys: never scores
        raise RewardError(
            f"reward {name!r} returned a {type(values).__name__}, expected a list of {expected} values (one number "
            "or None per completion, in order)"
        )
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}, expected a list of {expected} values")
    if len(values) != expected:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {expected} samples")
    return list(values)


def _invoke(name: str, fn: RewardFn, inputs: RewardInputs) -> object:
    """``call_reward``, with a ``sys.exit`` inside the reward turned into a :class:`RewardError` naming it."""
    try:
        return call_reward(fn, inputs)
    except SystemExit as err:
        if type(err) is not SystemExit:  # a subclass is the trainer's own stop (a signal), not the reward's exit
            raise
        raise RewardError(
            f"reward {name!r} called sys.exit({err.code!r}) (raised SystemExit): a reward must return its scores, "
            "never end the training process"
        ) from None


def _call_safely(name: str, fn: RewardFn, inputs: RewardInputs, timeout_s: float | None = None) -> _Call:
    """One function's call, under ``timeout_s`` (None: no budget) for the whole of it, retries included."""
    n = len(inputs)
    try:
        with deadline(timeout_s, RewardTimedOut):
            return _call_counted(name, fn, inputs)
    except RewardTimedOut:
        warnings.warn(
            f"reward {name!r} exceeded rl.reward_timeout_s={timeout_s} on this step: all {n} samples counted failed, "
            "scored 0 (a reward that keeps hanging stops the run after rl.reward_failure_patience steps)",
            stacklevel=3,
        )
        return _Call([0.0] * n, failed=n)


def _call_counted(name: str, fn: RewardFn, inputs: RewardInputs) -> _Call:
    n = len(inputs)
    try:
        values = _invoke(name, fn, inputs)
    except RewardError:
        raise
    except Exception as batch_error:  # noqa: BLE001 - retried per sample below, then counted
        scores, failures = [], []
        for i in range(n):
            try:
                value = _invoke(name, fn, inputs.sample(i))
            except RewardError:
                raise
            except Exception as err:  # noqa: BLE001 - one bad sample must not stop training
                failures.append((i, err))
                scores.append(math.inf)  # counted as failed below, with the infinite values
                continue
            scores.append(_as_float(_checked_values(name, value, 1)[0], name, i))
        if failures and len(failures) == n:  # a broken function (wrong signature, missing column), not a bad sample
            raise RewardError(
                f"reward {name!r} raised on every one of the {n} samples of this step (first: {failures[0][1]!r}); "
                "rewards are called by keyword as in TRL: fn(prompts=, completions=, completion_ids=, <dataset "
                "columns>, trainer_state=, **kwargs)"
            ) from failures[0][1]
        if failures:
            i, err = failures[0]
            warnings.warn(
                f"reward {name!r} raised on sample {i} ({err!r}) and {len(failures) - 1} more: "
                f"{len(failures)} of {n} samples scored 0",
                stacklevel=3,
            )
        else:
            warnings.warn(f"reward {name!r} raised on the batch ({batch_error!r}) but not per sample", stacklevel=3)
        call = _Call(scores, failed=len(failures))
        call.infinite = sum(math.isinf(v) for v in scores) - call.failed
    else:
        values = _checked_values(name, values, n)
        call = _Call([_as_float(v, name, i) for i, v in enumerate(values)])
        call.infinite = sum(math.isinf(v) for v in call.scores)
    if call.infinite:
        warnings.warn(
            f"reward {name!r} returned +-inf for {call.infinite} of {n} samples: counted as failed, scored 0",
            stacklevel=3,
        )
    call.failed += call.infinite
    call.scores = [0.0 if math.isinf(v) else v for v in call.scores]
    return call


class RewardFailureMonitor:
    """Stops a run whose reward function fails on most samples step after step (a broken verifier).

    ``update`` after each RL step: a function whose failed share (raised or +-inf) exceeds ``max_share`` for
    ``patience`` consecutive calls raises :class:`RewardError` naming it. One bad step resets nothing but its
    own streak: a function that recovers starts counting from 0 again.
    """

    def __init__(self, max_share: float = 0.5, patience: int = 3) -> None:
        self.max_share, self.patience = max_share, patience
        self.streak: dict[str, int] = {}

    def update(self, scores: RewardScores, n_samples: int) -> None:
        for name, failed in scores.n_failed.items():
            share = failed / max(n_samples, 1)
            self.streak[name] = self.streak.get(name, 0) + 1 if share > self.max_share else 0
            if self.streak[name] >= self.patience:
                raise RewardError(
                    f"reward {name!r} failed on {failed} of {n_samples} samples ({share:.0%}), over "
                    f"rl.max_reward_failure_share={self.max_share} for {self.streak[name]} consecutive RL steps "
                    "(rl.reward_failure_patience); fix the reward function (the warnings above show its errors)"
                )


def checked_reward_weights(weights: Sequence[float] | None, n_rewards: int) -> list[float]:
    """``rl.reward_weights``: one weight per reward (None = 1 each); a ValueError naming the key otherwise, since a
    zip over the two would silently drop the unmatched rewards."""
    weights = [1.0] * n_rewards if weights is None else list(weights)
    if len(weights) != n_rewards:
        raise ValueError(f"rl.reward_weights has {len(weights)} entries for {n_rewards} rl.rewards")
    return weights


def score_completions(
    reward_fns: dict[str, RewardFn],
    weights: Sequence[float],
    inputs: RewardInputs,
    monitor: RewardFailureMonitor | None = None,
    timeout_s: float | None = None,
) -> RewardScores:
    """Run every reward function and combine: ``total_i = sum_k w_k * r_k,i`` over finite ``r_k,i``.

    Each function is called by keyword as TRL calls it (:mod:`corrpo.rewards.call`) with ``inputs``: ``prompts``,
    ``completions``, ``completion_ids``, every dataset column (``answer`` among them, one value per completion),
    ``trainer_state`` and the ``log_metric`` / ``log_extra`` hooks. ``monitor`` (optional) sees the fault counts
    and may stop the run. ``timeout_s`` (``rl.reward_timeout_s``; None: none) bounds each function's call.
    """
    weights = checked_reward_weights(weights, len(reward_fns))
    completions = inputs.completions
    per_function, n_failed, n_unscored = {}, {}, {}
    total = torch.zeros(len(completions), dtype=torch.float32)
    for (name, fn), weight in zip(reward_fns.items(), weights, strict=True):
        call = _call_safely(name, fn, inputs, timeout_s)
        values = torch.tensor(call.scores, dtype=torch.float32)
        per_function[name] = values
        n_failed[name] = call.failed
        n_unscored[name] = int(values.isnan().sum())
        if completions and n_unscored[name] == len(completions):
            warnings.warn(
                f"reward {name!r} scored none of the {len(completions)} samples (all None/NaN): it adds nothing to "
                f"this step's rewards; its logged mean is NaN",
                stacklevel=2,
            )
        total += weight * torch.nan_to_num(values, nan=0.0)
    unscorable = torch.stack(list(per_function.values())).isnan().all(dim=0) if per_function else None
    scores = RewardScores(
        per_function=per_function, total=total, n_failed=n_failed, n_unscored=n_unscored,
        unscorable=unscorable if unscorable is not None and unscorable.any() else None,
    )  # fmt: skip
    if monitor is not None:
        monitor.update(scores, len(completions))
    return scores


def completion_rows(
    step: int,
    inputs: RewardInputs,
    scores: RewardScores,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    rho: torch.Tensor | None = None,
) -> list[dict]:
    """One row per completion (prompt, gold answer, completion, each reward part, total reward, advantage, rho_i,
    then any ``extra`` column a reward added through ``log_extra`` into ``inputs.log``). Prompt and completion are
    text (a conversational prompt as ``role: content`` lines, a message-list completion as its content), so the
    wandb table reads the same for both formats.

    The dashboard's completions table and the tests read these; NaN (unscored, or rho of a too-short or
    constant response) is kept as NaN rather than dropped, so every sampled completion has its row.
    """
    rewards, advantages = rewards.detach().float().cpu(), advantages.detach().float().cpu()
    rho = rho.detach().float().cpu() if rho is not None else None
    completions, answers = inputs.completions, inputs.columns.get("answer")
    extra = inputs.log.extra if inputs.log is not None else {}
    rows = []
    for i, (prompt, completion) in enumerate(zip(inputs.prompts, completions, strict=True)):
        row = {"step": step, "prompt": prompt_text(prompt)}
        if answers is not None:
            row["answer"] = answers[i]
        row["completion"] = completion_text(completion)
        row.update({f"reward/{name}": float(values[i]) for name, values in scores.per_function.items()})
        row.update({"reward": float(rewards[i]), "advantage": float(advantages[i])})
        row["rho"] = float(rho[i]) if rho is not None else math.nan
        row.update({column: values[i] for column, values in extra.items() if len(values) == len(completions)})
        rows.append(row)
    return rows
