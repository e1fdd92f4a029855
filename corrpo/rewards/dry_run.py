"""Call every reward once at start-up, on a few real RL records, so that a broken one stops the run in seconds.

A reward is first called at the first RL step, after the whole SFT phase: a wrong signature, an import inside the
function, a column the data lacks or a factory configured as a plain function used to surface hours in.
:func:`dry_run_rewards` calls each reward through the RL step's own path (:func:`corrpo.rewards.call.group_inputs`,
then :func:`corrpo.rewards.combine.score_completions`) on the first few RL records with placeholder completions:
the gold answer in ``<think>/<answer>`` tags, the gold answer in ``\\boxed{}``, and an empty string.

What the scores are does not matter (None, 0 and any number pass). What stops the run, with a
:class:`RewardDryRunError` naming the reward: raising on every placeholder (the RL step's fault tolerance retries
sample by sample and would count a partial failure, but a raise on every sample is a broken function), returning
+-inf on every one, or returning the wrong number of values or a non-number.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from corrpo.rewards.call import RewardFn, RewardLog, StepInfo, group_inputs
from corrpo.rewards.combine import RewardError, score_completions

DRY_RUN_RECORDS = 2
"""RL records the dry run scores (each with every placeholder completion)."""


class RewardDryRunError(RewardError):
    """A reward failed its start-up dry run: the message names it and says what it did."""


def placeholder_completions(answer: str) -> list[str]:
    """The texts each record is scored with: the gold in corrpo's tags, the gold boxed, and nothing."""
    return [f"<think>\n{answer}\n</think>\n<answer>{answer}</answer>", f"The answer is \\boxed{{{answer}}}.", ""]


def _hint(error: BaseException | None) -> str:
    if isinstance(error, TypeError):
        return "; a factory that builds the reward is configured as {function: <path>, kwargs: {...}}"
    if isinstance(error, KeyError):
        return "; a KeyError: a column the RL records lack?"
    return ""


def dry_run_rewards(
    reward_fns: dict[str, RewardFn],
    records: Sequence[dict],
    encode: Callable[[str], list[int]] | None = None,
    trainer_state: StepInfo | None = None,
) -> str:
    """Score the first :data:`DRY_RUN_RECORDS` of ``records`` (``prompt``, ``answer`` and any other columns, as the RL
    records hold them) with :func:`placeholder_completions`, one reward at a time.

    Args:
        reward_fns: the rewards by short name (what the RL step scores with).
        records: RL records; with none there is nothing to check.
        encode: text -> token ids, for the ``completion_ids`` keyword (default: UTF-8 bytes).
        trainer_state: what the rewards read as ``trainer_state`` (the first RL step's).

    Returns:
        A one-line summary for the log.

    Raises:
        RewardDryRunError: a reward raised on every placeholder, returned +-inf on every one, or returned a wrong shape.
    """
    rows = list(records[:DRY_RUN_RECORDS])
    if not rows:
        return "reward dry run skipped: no RL records"
    answers = [str(r.get("answer")) for r in rows]
    names = dict.fromkeys(k for r in rows for k in r if k not in ("prompt", "completion", "answer"))
    columns = {name: [r.get(name) for r in rows] for name in names}
    texts = [text for answer in answers for text in placeholder_completions(answer)]
    group_size = len(texts) // len(rows)
    encode = encode if encode is not None else (lambda text: list(text.encode()))
    shown_columns = ["answer", *names]
    for name, fn in reward_fns.items():
        inputs = group_inputs(
            [r["prompt"] for r in rows], answers, columns, texts, group_size,
            completion_ids=[list(encode(text)) for text in texts], trainer_state=trainer_state, log=RewardLog(),
        )  # fmt: skip
        where = f"reward {name!r} ({_describe(fn)}) failed its start-up dry run on {len(rows)} RL records"
        try:
            with warnings.catch_warnings():  # a raise on some placeholders is fine (counted, not warned here)
                warnings.simplefilter("ignore")
                scores = score_completions({name: fn}, [1.0], inputs)
        except RewardError as err:
            cause = err.__cause__
            raise RewardDryRunError(
                f"{where} x {group_size} placeholder completions, before any training: {err}{_hint(cause)}; "
                f"the records' columns: {shown_columns}"
            ) from None
        if scores.n_failed[name] == len(inputs):
            raise RewardDryRunError(
                f"{where}: it returned +-inf for every one of the {len(inputs)} placeholder completions"
            )
    return f"reward dry run: {', '.join(reward_fns)} called on {len(rows)} RL records x {group_size} placeholders: ok"


def _describe(fn: Any) -> str:
    """How a reward is shown in an error: its import path, or its type."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and name:
        return f"{module}:{name}"
    return repr(fn)
