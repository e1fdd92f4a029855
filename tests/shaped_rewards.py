"""Test-only reward resolved by import path (``shaped_rewards:length``).

The tiny test runs are too short for the accuracy and format rewards to differ within a group, so every
advantage would be 0 and RL would leave the weights as they were: a comparison of two RL runs would then
prove nothing. This reward differs between almost any two completions.
"""


def length(prompts, completions, **kwargs):
    """``len(completion) / 100`` per sample."""
    return [len(c) / 100 for c in completions]


def none_on_third(prompts, completions, **kwargs):
    """``len(completion) / 100``, but ``None`` (unscorable) for the third sample of every group of 4: an all-None
    row whenever it is the only reward."""
    return [None if i % 4 == 2 else len(c) / 100 + i / 1000 for i, c in enumerate(completions)]


def length_on_odd_answers(prompts, completions, answer, **kwargs):
    """``len(completion) / 100`` where the gold answer is odd, ``0`` where it is even: every even-answer group is
    constant, so dynamic sampling drops it and draws more prompts (tests/test_dynamic_sampling.py)."""
    return [len(c) / 100 if int(a) % 2 else 0.0 for c, a in zip(completions, answer, strict=True)]
