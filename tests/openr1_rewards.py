"""Test-only rewards that behave as open-r1's (``huggingface/open-r1``, ``src/open_r1/rewards.py``, commit 0056faa):
``accuracy_reward``, ``format_reward``, ``tag_count_reward``, ``reasoning_steps_reward``, ``len_reward``.

Written here (not imported: open-r1 is no package to install) with open-r1's signatures, its patterns and scores,
and above all its access pattern: each reads ``completion[0]["content"]``, so it raises ``TypeError: string indices
must be integers`` on a string completion. A run whose rewards these are proves that conversational data reaches
rewards as TRL hands it to them (one assistant message list per completion), with no adapter in between.
"""

import re

from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify


def _contents(completions) -> list[str]:
    return [completion[0]["content"] for completion in completions]


def _answer_config(boxed) -> list:
    """open-r1's extraction of a completion's answer: LaTeX, boxed first, only with an anchor."""
    normalization = NormalizationConfig(
        nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed=boxed, units=True
    )
    return [LatexExtractionConfig(normalization_config=normalization, boxed_match_priority=0,
                                  try_extract_without_anchor=False)]  # fmt: skip


def _gold(solution: str) -> list:
    return parse(solution, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])


def accuracy_reward(completions, solution, **kwargs):
    """1.0 when the completion's answer verifies against the gold ``solution``; 1.0 too when the gold does not
    parse (open-r1 skips such an example that way), else 0.0."""
    rewards = []
    for content, sol in zip(_contents(completions), solution, strict=False):
        gold = _gold(sol)
        if not gold:
            rewards.append(1.0)
            continue
        answer = parse(content, extraction_config=_answer_config("all"), extraction_mode="first_match")
        try:
            rewards.append(float(verify(answer, gold)))
        except Exception:  # noqa: BLE001 - open-r1 scores a failed verification 0
            rewards.append(0.0)
    return rewards


def format_reward(completions, **kwargs):
    """1.0 when the completion is ``<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`` and nothing else."""
    pattern = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"
    return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in _contents(completions)]


def tag_count_reward(completions, **kwargs) -> list[float]:
    """0.25 for each of the four tags :func:`format_reward` wants that occurs exactly once (with its newlines)."""

    def count_tags(text: str) -> float:
        tags = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
        return sum(0.25 for tag in tags if text.count(tag) == 1)

    return [count_tags(c) for c in _contents(completions)]


def reasoning_steps_reward(completions, **kwargs):
    """min(1, steps / 3): ``Step n:``, numbered lines, bullets and transition words count as steps."""
    pattern = r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)"
    return [min(1.0, len(re.findall(pattern, c)) / 3) for c in _contents(completions)]


def len_reward(completions, solution, **kwargs):
    """Kimi 1.5's length reward: ``0.5 - (len - min_len) / (max_len - min_len)`` for a correct answer, the same
    capped at 0 for a wrong one; all 0 when every completion has one length (an unparseable gold counts correct)."""
    contents = _contents(completions)
    correct = []
    for content, sol in zip(contents, solution, strict=False):
        gold = _gold(sol)
        if not gold:
            correct.append(True)
            continue
        answer = parse(content, extraction_config=_answer_config(True), extraction_mode="first_match")
        correct.append(verify(answer, gold))
    lengths = [len(content) for content in contents]
    shortest, longest = min(lengths), max(lengths)
    if longest == shortest:
        return [0.0] * len(completions)
    rewards = []
    for length, is_correct in zip(lengths, correct, strict=False):
        value = 0.5 - (length - shortest) / (longest - shortest)
        rewards.append(float(value if is_correct else min(0, value)))
    return rewards
