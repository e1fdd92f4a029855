"""Rewards are called as TRL calls them: by keyword, with every dataset column, step info and async allowed.

The reward functions below are written exactly in the form of TRL's GRPOTrainer docs ("Using a custom reward
function"); the fit test names them by import path (``test_reward_call:reward_len``), as a user would.
"""

import asyncio
import json

import pytest
from conftest import run_tiny
from reward_inputs import reward_inputs

from corrpo.rewards import accuracy_reward, format_reward
from corrpo.rewards.call import RewardInputs, RewardLog, StepInfo, call_reward
from corrpo.rewards.combine import RewardError, score_completions

SEEN: dict[str, list] = {"reward_len": [], "solution_reward": []}


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def solution_reward(completions, solution, **kwargs):
    """TRL's accuracy example in spirit: the gold comes from a dataset column named by keyword."""
    SEEN["solution_reward"].append(
        {"n": len(completions), "solution": list(solution), "state": kwargs["trainer_state"],
         "ids": kwargs["completion_ids"], "difficulty": kwargs["difficulty"]}
    )  # fmt: skip
    return [1.0 if s in c else 0.0 for c, s in zip(completions, solution, strict=True)]


async def async_reward(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    return [float(len(p) > 0) for p in prompts]


def without_kwargs(completions, answer):
    """No ``**kwargs``: gets only the keywords it names."""
    return [float(a in c) for c, a in zip(completions, answer, strict=True)]


def always_raises(completions, **kwargs):
    raise KeyError("solution")


def logs(completions, **kwargs):
    kwargs["log_metric"]("my_metric", 3.0)
    kwargs["log_extra"]("length", [len(c) for c in completions])
    return [0.0] * len(completions)


def _inputs(**columns):
    completions = ["<think>x</think><answer>4</answer>", "5", "four"]
    return RewardInputs(prompts=["2+2?"] * 3, completions=completions, columns=columns)


def test_trl_forms_corrpo_rewards_async_and_named_only_keywords():
    inputs = _inputs(answer=["4", "4", "4"], solution=["4", "5", "x"])
    assert call_reward(reward_len, inputs) == [-14, -19, -16]
    assert call_reward(without_kwargs, inputs) == [1.0, 0.0, 0.0]
    assert call_reward(async_reward, inputs) == [1.0, 1.0, 1.0]
    assert call_reward(accuracy_reward, inputs) == [1.0, 0.0, 0.0]
    assert call_reward(format_reward, inputs) == [1.0, 0.0, 0.0]
    scored = reward_inputs(
        inputs.prompts, inputs.completions, ["4"] * 3,
        columns={"solution": ["4", "5", "x"], "difficulty": [1, 2, 3]}, completion_ids=[[1], [2], [3]],
        trainer_state=StepInfo(global_step=7, max_steps=9, rl_step=1),
    )  # fmt: skip
    scores = score_completions({"len": reward_len, "sol": solution_reward}, [1.0, 2.0], scored)
    assert scores.total.tolist() == [-14.0 + 2.0, -19.0 + 2.0, -16.0]
    seen = SEEN["solution_reward"][-1]
    assert seen["ids"] == [[1], [2], [3]] and seen["difficulty"] == [1, 2, 3] and seen["state"].global_step == 7


def test_async_reward_inside_a_running_event_loop():
    async def main():  # a notebook's kernel runs one
        return call_reward(async_reward, _inputs())

    assert asyncio.run(main()) == [1.0, 1.0, 1.0]


def test_a_reward_raising_on_every_sample_is_an_error_naming_it():
    with pytest.raises(RewardError, match="'always_raises' raised on every one of the 3 samples"):
        score_completions({"always_raises": always_raises}, [1.0], reward_inputs(["p"] * 3, ["a", "b", "c"], ["1"] * 3))


def test_log_metric_and_log_extra_are_collected():
    log = RewardLog()
    score_completions({"logs": logs}, [1.0], reward_inputs(["p"] * 2, ["a", "bb"], ["1"] * 2, log=log))
    assert log.metrics == {"my_metric": 3.0} and log.extra == {"length": [1, 2]}


def test_trl_style_rewards_score_a_shrunk_fit_with_a_dataset_column(tmp_path, one_thread):
    from corrpo.data.arithmetic import ArithmeticTask

    records = ArithmeticTask().records("train", 80)
    path = tmp_path / "rl.jsonl"
    with path.open("w") as handle:
        for i, r in enumerate(records):
            row = {"prompt": r["prompt"], "answer": r["answer"], "solution": r["answer"], "difficulty": i % 3}
            handle.write(json.dumps(row) + "\n")
    SEEN["solution_reward"].clear()
    cli = run_tiny(
        tmp_path / "runs",
        f"--data.rl_source={path}",
        "--data.n_test=8",
        "--model.rl.rewards=[test_reward_call:reward_len, test_reward_call:solution_reward, accuracy]",
        "--model.rl.reward_weights=[1.0, 1.0, 1.0]",
    )
    dry_run, *calls = SEEN["solution_reward"]
    assert dry_run["n"] == 6  # the start-up dry run: 2 RL records x 3 placeholder completions, before SFT
    assert len(calls) == 3  # one per RL step (2 prompts x 4 generations each)
    assert all(call["n"] == 8 for call in calls)
    by_prompt = {r["prompt"]: r["answer"] for r in records}
    rows = cli.model.last_completions
    assert [row["answer"] for row in rows] == [by_prompt[row["prompt"]] for row in rows]  # the gold in the table
    assert calls[-1]["solution"] == [row["answer"] for row in rows]  # the column, repeated per group member
    assert calls[-1]["difficulty"][0] == calls[-1]["difficulty"][3]
    assert [len(ids) for ids in calls[-1]["ids"]] and calls[-1]["state"].max_steps == 9
    assert [call["state"].global_step for call in calls] == [6, 7, 8]
    for row in rows:
        assert row["reward/reward_len"] == -abs(20 - len(row["completion"]))
        assert row["reward/solution_reward"] == float(row["answer"] in row["completion"])
        assert row["reward/accuracy"] in (0.0, 1.0)
