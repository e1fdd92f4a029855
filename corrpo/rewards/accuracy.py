"""Verifiable accuracy reward: is the completion's final answer mathematically equal to the gold answer?

Uses math-verify (``parse`` then ``verify(gold, prediction)``; the order matters: the gold decides what
kind of object is compared). math-verify bounds its own time with SIGALRM, which only works in the main
thread, so off the main thread (dataloader workers, async reward servers) its timeouts are switched off and
the answer text is truncated instead; in the main thread each parse/verify call gets ``TIMEOUT_S`` and
each completion stops trying further readings once ``TIMEOUT_S`` has passed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from math_verify import parse, verify

from corrpo.rewards.answer import extract_answer

MAX_ANSWER_CHARS = 2_000
"""Answer text beyond this is cut before parsing, so garbage cannot make a step slow."""
TIMEOUT_S = 1
"""Seconds per math-verify call (main thread only: SIGALRM)."""


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _wrap(text: str) -> str:
    """``$text$`` unless the text already has math delimiters, so that bare LaTeX (``\\frac12``) parses."""
    return text if "$" in text else f"${text}$"


def parse_gold(gold: Any) -> list | None:
    """The parsed gold answer, or None when math-verify finds no mathematical object in it."""
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        return None
    try:
        parsed = parse(_wrap(gold.strip()), parsing_timeout=_timeout())
    except Exception:  # noqa: BLE001 - a gold math-verify cannot read is "unscorable", not a crash
        return None
    # With its default fallback math-verify returns the raw string when nothing parsed: not a usable gold.
    return parsed if any(not isinstance(item, str) for item in parsed) else None


def score_answer(gold: list, completion: Any) -> float:
    """1.0 if the completion's extracted answer verifies against the parsed gold, else 0.0; never raises."""
    answer = extract_answer(completion)
    if not answer:
        return 0.0
    answer = answer[:MAX_ANSWER_CHARS]
    timeout = _timeout()
    start = time.monotonic()
    for candidate in dict.fromkeys((answer, _wrap(answer))):
        if timeout is not None and time.monotonic() - start > timeout:
            break
        try:
            prediction = parse(candidate, parsing_timeout=timeout)
            if prediction and verify(gold, prediction, timeout_seconds=timeout):
                return 1.0
        except Exception:  # noqa: BLE001 - garbage completions score 0, they never stop training
            continue
    return 0.0


def accuracy_reward(prompts: list[str], completions: list[Any], answer: list[str], **kwargs) -> list[float | None]:
    """Per completion: 1.0 if its answer equals the gold (math-verify), 0.0 if not or none was given, None
    if the gold itself cannot be parsed (the sample is unscorable, not wrong)."""
    if len(answer) != len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} gold answers")
    scores: list[float | None] = []
    parsed_golds: dict[str, list | None] = {}
    for completion, gold in zip(completions, answer, strict=True):
        key = str(gold)
        if key not in parsed_golds:  # a GRPO group shares one gold: parse it once
            parsed_golds[key] = parse_gold(gold)
        parsed = parsed_golds[key]
        scores.append(None if parsed is None else score_answer(parsed, completion))
    return scores
