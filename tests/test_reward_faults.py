"""Reward faults that used to be masked: each is now an error naming the function, or counted and warned."""

import math
import warnings

import pytest
from reward_inputs import reward_inputs

from corrpo.rewards.combine import RewardError, RewardFailureMonitor, score_completions

N = 8
PROMPTS, COMPLETIONS, ANSWERS = ["p"] * N, [f"c{i}" for i in range(N)], ["1"] * N


class Counted:
    """A reward function that records how often it is called and returns ``make(n)`` for n completions."""

    def __init__(self, make):
        self.make, self.calls = make, 0

    def __call__(self, prompts, completions, answer, **kwargs):
        self.calls += 1
        return self.make(len(completions))


def test_a_reward_returning_the_wrong_number_of_values_is_an_error_naming_it_and_the_counts_not_retried():
    eleven = Counted(lambda n: [1.0] * 11)
    with pytest.raises(RewardError, match=r"reward 'eleven' returned 11 values for 8 samples"):
        score_completions({"eleven": eleven}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS))
    assert eleven.calls == 1  # not retried per sample (which used to take element 0 of each call)


def test_a_reward_returning_a_non_number_or_a_non_list_is_an_error_naming_it():
    with pytest.raises(RewardError, match=r"reward 'words' returned 'good' for sample 0"):
        score_completions(
            {"words": Counted(lambda n: ["good"] * n)}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS)
        )
    with pytest.raises(RewardError, match=r"reward 'scalar' returned float, expected a list of 8"):
        score_completions({"scalar": Counted(lambda n: 1.0)}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS))


def test_infinite_rewards_are_counted_as_failed_scored_zero_and_warned():
    values = [1.0, math.inf, -math.inf, 0.5, None, 1.0, 1.0, 1.0]
    with pytest.warns(UserWarning, match=r"reward 'inf' returned \+-inf for 2 of 8 samples"):
        scores = score_completions(
            {"inf": Counted(lambda n: values)}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS)
        )
    assert scores.n_failed == {"inf": 2}
    assert scores.n_unscored == {"inf": 1}
    assert scores.total.tolist() == [1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("unscored", [None, math.nan], ids=["none", "nan"])
def test_a_reward_that_scores_no_sample_is_reported_and_its_mean_is_nan_not_zero(unscored):
    with pytest.warns(UserWarning, match=r"reward 'blind' scored none of the 8 samples"):
        scores = score_completions(
            {"blind": Counted(lambda n: [unscored] * n)}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS)
        )
    assert scores.n_unscored == {"blind": 8} and scores.n_failed == {"blind": 0}
    assert scores.per_function["blind"].nanmean().isnan()  # what the module logs as rewards/blind/mean


def test_a_reward_raising_on_some_samples_warns_once_with_the_count():
    def odd(prompts, completions, answer, **kwargs):
        if any(int(c[1:]) % 2 for c in completions):
            raise RuntimeError("odd")
        return [1.0] * len(completions)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = score_completions({"odd": odd}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS))
    messages = [str(w.message) for w in caught]
    assert messages == ["reward 'odd' raised on sample 1 (RuntimeError('odd')) and 3 more: 4 of 8 samples scored 0"]
    assert scores.n_failed == {"odd": 4} and scores.total.tolist() == [1.0, 0.0] * 4


def _mostly_raises(prompts, completions, answer, **kwargs):
    """A verifier that is down for 6 of the 8 samples (raising on all of them is an error at once instead)."""
    if len(completions) > 1 or int(completions[0][1:]) >= 2:
        raise RuntimeError("verifier down")
    return [1.0]


def test_a_reward_failing_on_too_many_samples_for_patience_steps_aborts_naming_it():
    monitor = RewardFailureMonitor(max_share=0.5, patience=3)
    fns = {"accuracy_ok": Counted(lambda n: [1.0] * n), "broken": _mostly_raises}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # two bad steps: still under the patience
            score_completions(fns, [1.0, 1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS), monitor)
        with pytest.raises(RewardError, match=r"reward 'broken' failed on 6 of 8 samples \(75%\).*3 consecutive"):
            score_completions(fns, [1.0, 1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS), monitor)


def test_a_step_under_the_failure_share_resets_the_streak():
    monitor = RewardFailureMonitor(max_share=0.5, patience=2)
    bad = {"r": _mostly_raises}
    good = {"r": Counted(lambda n: [1.0] * n)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fns in (bad, good, bad, good, bad):
            score_completions(fns, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS), monitor)
    assert monitor.streak == {"r": 1}


# ------------------------------------------------------------------- shapes, sys.exit and the reward deadline
@pytest.mark.parametrize(
    "make", [lambda n: {i: 1.0 for i in range(n)}, lambda n: [{"score": 1.0}] * n, lambda n: set(range(n))]
)
def test_a_reward_returning_a_dict_or_dicts_is_an_error_naming_it_never_scored_by_its_keys(make):
    keyed = Counted(make)
    with pytest.raises(RewardError, match=r"reward 'keyed' returned"):
        score_completions({"keyed": keyed}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS))


def test_sys_exit_in_a_reward_is_an_error_naming_it_not_the_end_of_the_run():
    def quits(completions, **kwargs):
        raise SystemExit(0)

    with pytest.raises(RewardError, match=r"reward 'quits' called sys.exit\(0\)"):
        score_completions({"quits": quits}, [1.0], reward_inputs(PROMPTS, COMPLETIONS, ANSWERS))


def test_a_reward_over_its_timeout_counts_every_sample_failed_and_warns_without_retrying_per_sample():
    import time

    slow = Counted(lambda n: time.sleep(30) or [1.0] * n)
    start = time.monotonic()
    with pytest.warns(UserWarning, match=r"reward 'slow' exceeded rl.reward_timeout_s=0.2 .*all 8 samples"):
        scores = score_completions(
            {"slow": slow, "fine": Counted(lambda n: [1.0] * n)}, [1.0, 1.0],
            reward_inputs(PROMPTS, COMPLETIONS, ANSWERS), timeout_s=0.2,
        )  # fmt: skip
    assert time.monotonic() - start < 5 and slow.calls == 1
    assert scores.n_failed["slow"] == N and scores.total.tolist() == [1.0] * N


def test_the_reward_timeout_wraps_the_accuracy_rewards_own_deadline_without_being_swallowed():
    import time

    from corrpo.rewards.deadline import DeadlineExceeded, deadline

    class Outer(BaseException):
        pass

    with pytest.raises(Outer):  # the inner budget is longer than what is left of the outer one
        with deadline(0.2, Outer):
            try:
                with deadline(5.0):
                    time.sleep(10)
            except DeadlineExceeded:
                pytest.fail("the outer deadline was taken for the inner one")
    with deadline(1.0, Outer):  # an inner budget that ends first is the inner's, and the outer is re-armed
        with pytest.raises(DeadlineExceeded), deadline(0.1):
            time.sleep(10)
        with pytest.raises(Outer):
            time.sleep(10)
