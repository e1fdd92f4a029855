"""Reward functions on tricky strings: answer extraction, math-verify accuracy, format, and the registry."""

import threading
import time

import pytest

from corrpo.rewards import REWARD_REGISTRY, resolve_reward
from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.answer import extract_answer
from corrpo.rewards.format import format_reward


def acc(completion, gold):
    return accuracy_reward(["p"], [completion], answer=[gold])[0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>x</think><answer>9</answer>", "9"),
        ("<answer> 7 </answer> trailing words", "7"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>1</answer> <answer>2", "1"),
        ("so \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{1} and \\boxed{2}", "2"),
        ("\\boxed{3} then \\boxed{unclosed", "3"),
        ("<answer>a</answer> \\boxed{b}", "a"),
        ("<answer></answer>", ""),
        ("no answer here", None),
        ("", None),
        (None, None),
        ([{"role": "assistant", "content": "<answer>5</answer>"}], "5"),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("<think>4+3=7</think><answer>7</answer>", "7", 1.0),
        ("<answer>8</answer>", "7", 0.0),
        ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
        ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
        ("<answer>9.0</answer>", "9", 1.0),
        ("<answer>9</answer>", "9.0", 1.0),
        ("<answer>9</answer> but actually 10", "9", 1.0),
        ("<answer>3</answer><answer>9</answer>", "9", 1.0),
        ("<answer>9</answer><answer>3</answer>", "9", 0.0),
        ("the result is \\boxed{\\frac{6}{3}}", "2", 1.0),
        ("<answer>\\boxed{42}</answer>", "42", 1.0),
        ("", "9", 0.0),
        ("<answer></answer>", "9", 0.0),
        ("<answer>banana</answer>", "9", 0.0),
        ("<answer>}}{{\\frac{</answer>", "9", 0.0),
    ],
)
def test_accuracy_reward(completion, gold, expected):
    assert acc(completion, gold) == expected


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{", None])
def test_unparseable_gold_is_none(gold):
    assert acc("<answer>1</answer>", gold) is None


def test_numeric_gold_and_batch():
    out = accuracy_reward(["a", "b", "c"], ["<answer>9</answer>", "<answer>2</answer>", "x"], answer=[9, "2", "2"])
    assert out == [1.0, 1.0, 0.0]


def test_garbage_is_fast_and_zero():
    garbage = "}{\\frac{\\sqrt{" * 700 + "<answer>" + "1+(" * 3000 + "</answer>"
    assert len(garbage) > 10_000
    start = time.monotonic()
    assert acc("x" * 10_000, "9") == 0.0
    assert acc(garbage, "9") == 0.0
    assert time.monotonic() - start < 5.0


def test_accuracy_off_main_thread():
    """math-verify's SIGALRM timeouts must be switched off in worker threads, not crash them."""
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(v=accuracy_reward(["p", "p"], ["<answer>1/2</answer>", "nope"], ["0.5", "1"]))
    )
    thread.start()
    thread.join(timeout=30)
    assert result["v"] == [1.0, 0.0]


def test_accuracy_length_mismatch():
    with pytest.raises(ValueError, match="gold answers"):
        accuracy_reward(["p"], ["a", "b"], answer=["1"])


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>4+3=7 7*2=14</think><answer>14</answer>", 1.0),
        ("  <think>\nmulti\nline\n</think>\n<answer>1</answer>\n", 1.0),
        ("<think>a</think><answer>1</answer> trailing", 0.0),
        ("<answer>1</answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(["p"], [completion], answer=["1"]) == [expected]


def test_resolve_reward_by_name_and_path():
    assert resolve_reward("accuracy") is accuracy_reward
    assert resolve_reward("format") is format_reward
    assert set(REWARD_REGISTRY) >= {"accuracy", "format"}
    assert resolve_reward("corrpo.rewards.format:format_reward") is format_reward
    assert resolve_reward("corrpo.rewards.accuracy.accuracy_reward") is accuracy_reward


@pytest.mark.parametrize(
    "name", ["nope", "corrpo.rewards.format:missing", "no_such_pkg.mod:fn", "corrpo.rewards:RewardFn_"]
)
def test_resolve_unknown_reward(name):
    with pytest.raises(ValueError, match="accuracy"):
        resolve_reward(name)


def test_resolve_not_callable():
    with pytest.raises(ValueError, match="not callable"):
        resolve_reward("corrpo.rewards.accuracy:MAX_ANSWER_CHARS")


def test_two_rewards_with_one_short_name_are_an_error_naming_rl_rewards():
    from corrpo.rewards import reward_functions

    fns = reward_functions(["accuracy", "format", "corrpo.rewards.accuracy:accuracy_reward"])
    assert list(fns) == ["accuracy", "format", "accuracy_reward"]
    with pytest.raises(ValueError, match="rl.rewards: two rewards are named 'format_reward'"):
        reward_functions(["corrpo.rewards.format:format_reward", "corrpo.rewards.format.format_reward"])


def test_accuracy_reward_verifies_each_distinct_gold_answer_pair_once_with_the_same_scores(monkeypatch):
    """A group's completions that give the same answer text share one parse/verify; every score equals the
    completion's own :func:`score_answer` (the memo keys on the gold and the extracted answer, all a score reads)."""
    import corrpo.rewards.accuracy as accuracy

    completions = ["<think>a</think><answer>4</answer>", "<answer> 4 </answer> x", "<answer>5</answer>",
                   "no answer", "<answer>4</answer>", "<answer>1/2</answer>", "<answer>0.5</answer>"]  # fmt: skip
    golds = ["4", "4", "4", "4", "5", "0.5", "0.5"]
    expected = [accuracy.score_answer(accuracy.parse_gold(g), c) for c, g in zip(completions, golds, strict=True)]
    calls = []
    real = accuracy.score_extracted
    monkeypatch.setattr(accuracy, "score_extracted", lambda gold, answer: calls.append(answer) or real(gold, answer))
    assert accuracy.accuracy_reward(["p"] * 7, completions, answer=golds) == expected == [1, 1, 0, 0, 0, 1, 1]
    # (4, "4") is scored once for three completions; (4, None), (4, "5"), (5, "4"), (0.5, "1/2"), (0.5, "0.5")
    assert sorted(calls, key=str) == sorted(["4", "5", None, "4", "1/2", "0.5"], key=str)
