"""Format reward: does the completion follow ``<think>...</think><answer>...</answer>`` and nothing else?

The answer block must hold something: a bare ``<think></think><answer></answer>`` scaffold earns nothing,
or a policy could collect the format reward without ever answering.
"""

from __future__ import annotations

import re
from typing import Any

from corrpo.rewards.answer import completion_text

FORMAT_PATTERN = re.compile(r"^\s*<think>.*?</think>\s*<answer>\s*\S.*?</answer>\s*$", re.DOTALL)


def format_reward(prompts: list[str], completions: list[Any], answer: list[str] | None = None, **kwargs) -> list[float]:
    """1.0 per completion that is just a think block then a non-empty answer block (whitespace ok), else 0."""
    return [1.0 if FORMAT_PATTERN.match(completion_text(c)) else 0.0 for c in completions]
