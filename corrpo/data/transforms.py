"""Named field transforms: a field mapping value ``"column|transform"`` reads ``column`` and transforms it.

Why: Hugging Face math datasets rarely have a column that *is* the prompt, the trace or the gold answer.
GSM8K ends its solution with ``#### 42``, MATH keeps its answer in the solution's last ``\\boxed{...}``,
chat datasets (Mixture-of-Thoughts, OpenR1-Math's ``messages``) hold a list of ``{role, content}`` turns.
So ``data.rl_fields: {prompt: question, answer: "answer|gsm8k_answer"}`` maps GSM8K as it is published.

A transform returns the canonical string or raises :class:`TransformError` saying what is wrong with the
value; :func:`corrpo.data.records.load_records` adds the file, line and field to the message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from corrpo.rewards.answer import last_boxed

SEPARATOR = "|"
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")


class TransformError(ValueError):
    """A value a transform cannot read; the message completes "field 'x' (column 'c|t') ..."."""


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TransformError(f"must be a non-empty string, got {value!r:.60}")
    return value


def _split_hashes(value: Any) -> tuple[str, str]:
    """GSM8K ``"steps\\n#### 1,234"`` -> ``("steps", "1234")``: the text after the last ``####``, commas dropped."""
    text = _string(value)
    steps, sep, final = text.rpartition("####")
    final = _DIGIT_COMMA.sub("", final.strip())
    if not sep or not final:
        raise TransformError(f"has no final '#### <answer>' line: {text[-60:]!r}")
    return steps, final


def gsm8k_answer(value: Any) -> str:
    """The gold answer of a GSM8K solution: the text after its last ``####`` (thousands commas dropped)."""
    return _split_hashes(value)[1]


def gsm8k_solution(value: Any) -> str:
    """A GSM8K solution as an SFT trace whose answer the accuracy reward can read: calculator annotations
    (``<<48/2=24>>``) removed and the ``#### 72`` line replaced by ``The answer is $\\boxed{72}$.``."""
    steps, final = _split_hashes(value)
    return f"{_CALCULATOR.sub('', steps).rstrip()}\nThe answer is $\\boxed{{{final}}}$."


def boxed(value: Any) -> str:
    """The content of the last ``\\boxed{...}`` (nested braces kept), e.g. MATH's gold answer in its solution."""
    text = _string(value)
    content = last_boxed(text)
    if content is None or not content.strip():
        raise TransformError(f"has no \\boxed{{...}} answer: {text[-60:]!r}")
    return content.strip()


def _messages(value: Any) -> list[Mapping]:
    """A list of ``{role, content}`` mappings (a list from json/HF, a numpy array from parquet)."""
    if isinstance(value, str | bytes | Mapping) or not hasattr(value, "__iter__"):
        raise TransformError(f"must be a list of {{role, content}} messages, got {type(value).__name__}")
    messages = list(value)
    if not all(isinstance(m, Mapping) for m in messages):
        raise TransformError("must be a list of {role, content} messages")
    return messages


def _content(value: Any, role: str, last: bool) -> str:
    messages = [m for m in _messages(value) if m.get("role") == role]
    if not messages:
        roles = [m.get("role") for m in _messages(value)]
        raise TransformError(f"has no {role!r} message (roles: {roles})")
    content = messages[-1 if last else 0].get("content")
    if not isinstance(content, str) or not content.strip():
        raise TransformError(f"has an empty {role!r} message")
    return content


def user(value: Any) -> str:
    """The content of the first ``user`` message of a chat (the prompt)."""
    return _content(value, "user", last=False)


def assistant(value: Any) -> str:
    """The content of the last ``assistant`` message of a chat (the reasoning trace)."""
    return _content(value, "assistant", last=True)


TRANSFORMS: dict[str, Callable[[Any], str]] = {
    "gsm8k_answer": gsm8k_answer,
    "gsm8k_solution": gsm8k_solution,
    "boxed": boxed,
    "user": user,
    "assistant": assistant,
}


def parse_field(spec: str) -> tuple[str, Callable[[Any], str] | None]:
    """``"column"`` -> ``("column", None)``; ``"column|name"`` -> ``("column", TRANSFORMS[name])``."""
    column, sep, name = (part.strip() for part in spec.partition(SEPARATOR))
    if not column:
        raise ValueError(f"fields: no column name in {spec!r}")
    if not sep:
        return column, None
    if name not in TRANSFORMS:
        raise ValueError(f"fields: unknown transform {name!r} in {spec!r}; expected one of {sorted(TRANSFORMS)}")
    return column, TRANSFORMS[name]
