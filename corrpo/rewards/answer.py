"""Find a completion's final answer: the last ``<answer>...</answer>``, else the last ``\\boxed{...}``."""

from __future__ import annotations

import re
from typing import Any

from corrpo.rewards.call import completion_text as text_of_completion

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = "\\boxed{"


def completion_text(completion: Any) -> str:
    """A completion as text (:func:`corrpo.rewards.call.completion_text`: a string as is, a TRL conversational
    completion as the content of its last message), anything else as ``""`` (so that it scores as wrong, never
    raises): corrpo's own rewards read both forms through it."""
    try:
        return text_of_completion(completion)
    except TypeError:
        return ""


def _balanced_from(text: str, start: int) -> str | None:
    """The text from ``start`` up to the brace closing the one just before it, or None if it never closes."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` whose braces balance (nested braces kept), or None."""
    position = text.rfind(_BOXED)
    while position != -1:
        content = _balanced_from(text, position + len(_BOXED))
        if content is not None:
            return content
        position = text.rfind(_BOXED, 0, position)
    return None


def extract_answer(completion: str | list[dict[str, Any]]) -> str | None:
    """Stripped content of the LAST ``<answer>...</answer>``, else of the last ``\\boxed{...}``, else None.

    Text after ``</answer>`` is ignored; an empty tag gives ``""`` (a wrong answer, not a missing one).
    """
    completion = completion_text(completion)
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    boxed = last_boxed(completion)
    return boxed.strip() if boxed is not None else None
