"""Call a reward function the way TRL's GRPOTrainer does: everything by keyword, dataset columns included.

TRL calls ``reward_func(prompts=..., completions=..., completion_ids=..., **reward_kwargs)`` where
``reward_kwargs`` holds every dataset column of the batch (repeated per group member, like the prompts) and
``trainer_state``, ``log_extra``, ``log_metric``. So a function written as TRL's docs show works here unmodified::

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c)) for c in completions]

    def accuracy(completions, solution, **kwargs):  # ``solution``: a column of the user's dataset
        ...

and so do corrpo's own rewards (``accuracy_reward(prompts, completions, answer, **kwargs)``). A function
without ``**kwargs`` gets only the keywords it names (a column it does not name is not an error), and an
``async def`` function is awaited (in a private event loop, or on a helper thread when one is already running,
as in a notebook).

This module knows nothing of weights or failures: :mod:`corrpo.rewards.combine` decides what a raise means.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[..., list]
"""A reward as TRL defines one: called by keyword (``prompts``, ``completions``, columns, ...), one value or None per
sample."""

Messages = list[dict[str, Any]]
"""A conversation as TRL's conversational format writes one: ``[{"role": "user", "content": "..."}, ...]``."""
Prompt = str | Messages
"""A prompt as the data gives it: text (standard format) or a message list (conversational format)."""


def is_conversational(prompt: Any) -> bool:
    """Whether ``prompt`` is in TRL's conversational format: a non-empty list of ``{"role", "content"}`` dicts."""
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )


def reward_completions(texts: Sequence[str], prompts: Sequence[Prompt]) -> list:
    """The completions as TRL hands them to rewards: for a conversational prompt one assistant message list
    ``[{"role": "assistant", "content": text}]`` (with the prompt's own trailing assistant prefill, if any, put
    in front, as TRL does), else the text itself."""
    out: list = []
    for text, prompt in zip(texts, prompts, strict=True):
        if not is_conversational(prompt):
            out.append(text)
            continue
        last = prompt[-1]
        prefill = last["content"] if last["role"] == "assistant" and isinstance(last["content"], str) else ""
        out.append([{"role": "assistant", "content": prefill + text}])
    return out


def completion_text(completion: Any) -> str:
    """The text of a completion in either form: a string, or the last message's ``content`` of a message list
    (so one reward reads standard and conversational data alike)."""
    if isinstance(completion, str):
        return completion
    if is_conversational(completion):
        content = completion[-1]["content"]
        return content if isinstance(content, str) else str(content)
    raise TypeError(f"a completion is a string or a message list, got {type(completion).__name__}")


def prompt_text(prompt: Any) -> str:
    """A prompt as readable text (the completions table, eval rows): a string as is, a message list as one
    ``role: content`` line per message."""
    if is_conversational(prompt):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return prompt if isinstance(prompt, str) else str(prompt)


@dataclass
class StepInfo:
    """``trainer_state`` as a reward sees it: the attributes of TRL's TrainerState a reward usually reads."""

    global_step: int = 0
    """Train batches finished before this one (SFT and RL together)."""
    max_steps: int = 0
    """Train batches of the whole run."""
    rl_step: int = 0
    """0-based RL step of this batch (drives e.g. a curriculum on the RL phase only)."""


@dataclass
class RewardLog:
    """What rewards reported through ``log_metric`` / ``log_extra`` during one step."""

    metrics: dict[str, float] = field(default_factory=dict)
    """``log_metric(name, value)``: scalars, logged with the step's metrics as ``rl/<name>`` (under DDP every rank's
    rewards must log the same names, as for any per-step key)."""
    extra: dict[str, list] = field(default_factory=dict)
    """``log_extra(column, values)``: one value per completion, added to the completions table."""

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[str(name)] = float(value)

    def log_extra(self, column: str, values: Sequence) -> None:
        self.extra[str(column)] = list(values)


@dataclass
class RewardInputs:
    """The ``N = B * G`` samples of one scoring call, as TRL passes them (every per-sample list has length N)."""

    prompts: list[Prompt]
    completions: list
    """Strings, or assistant message lists when the prompts are conversational (:func:`reward_completions`)."""
    columns: dict[str, list] = field(default_factory=dict)
    """Dataset columns by name (``answer`` and any other column of the records), one value per sample."""
    completion_ids: list[list[int]] | None = None
    """Token ids of each completion (padding dropped); None when the caller has none (it is passed as None)."""
    trainer_state: StepInfo | None = None
    log: RewardLog | None = None

    def __len__(self) -> int:
        return len(self.completions)

    def sample(self, index: int) -> RewardInputs:
        """The inputs of sample ``index`` alone (for retrying a function that raised on the batch)."""
        one = slice(index, index + 1)
        return RewardInputs(
            prompts=self.prompts[one],
            completions=self.completions[one],
            columns={name: values[one] for name, values in self.columns.items()},
            completion_ids=self.completion_ids[one] if self.completion_ids is not None else None,
            trainer_state=self.trainer_state,
            log=None,  # a per-sample retry logs nothing: one sample's metric is not the batch's
        )

    def kwargs(self) -> dict[str, Any]:
        """Every keyword a reward may take: prompts, completions, completion_ids, the columns, step info, log hooks."""
        log = self.log if self.log is not None else RewardLog()
        out: dict[str, Any] = {name: list(values) for name, values in self.columns.items()}
        out.update(
            prompts=list(self.prompts),
            completions=list(self.completions),
            completion_ids=self.completion_ids,
            trainer_state=self.trainer_state if self.trainer_state is not None else StepInfo(),
            log_metric=log.log_metric,
            log_extra=log.log_extra,
        )
        return out


def group_inputs(
    prompts: Sequence[Prompt],
    answers: Sequence[str],
    columns: dict[str, list] | None,
    texts: Sequence[str],
    group_size: int,
    **fields: Any,
) -> RewardInputs:
    """The :class:`RewardInputs` of ``len(prompts) * group_size`` completion ``texts`` (grouped by prompt), as the RL
    step and the start-up dry run build them: prompts, answers (the ``answer`` column) and every other column repeated
    per group member, completions as :func:`reward_completions` hands them over; ``fields`` are the other
    :class:`RewardInputs` fields (``completion_ids``, ``trainer_state``, ``log``)."""
    group_prompts = [p for p in prompts for _ in range(group_size)]
    group_columns = {name: [v for v in values for _ in range(group_size)] for name, values in (columns or {}).items()}
    group_columns["answer"] = [a for a in answers for _ in range(group_size)]
    return RewardInputs(
        prompts=group_prompts, completions=reward_completions(texts, group_prompts), columns=group_columns, **fields
    )


def _accepted(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` cut to the keywords ``fn`` names, unless it takes ``**kwargs`` (then all of them)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: pass everything
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in kwargs.items() if k in names}


def _run_coroutine(coroutine) -> Any:
    """Await ``coroutine`` from synchronous code, inside or outside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine)
        except BaseException as err:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = err

    thread = threading.Thread(target=target, name="corrpo-async-reward")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def call_reward(fn: Callable, inputs: RewardInputs) -> list:
    """``fn(**TRL's keywords)``, awaited when ``fn`` is async; an iterator of values becomes a list.

    What it returned is checked (a sequence of one number or None per sample) by
    :mod:`corrpo.rewards.combine`, which turns a wrong shape into an error naming the function.
    """
    values = fn(**_accepted(fn, inputs.kwargs()))
    if inspect.isawaitable(values):
        values = _run_coroutine(values)
    if (
        not isinstance(values, (str, bytes, Sequence))
        and hasattr(values, "__iter__")
        and not hasattr(values, "__len__")
    ):
        values = list(values)
    return values
