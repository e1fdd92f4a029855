"""Verifiable accuracy reward: is the completion's final answer mathematically equal to the gold answer?

Uses math-verify (``parse`` then ``verify(gold, prediction)``; the order matters: the gold decides what
kind of object is compared). Time is bounded per completion, not per call: math-verify's own whole-second
alarms are off, and one :func:`corrpo.rewards.deadline.deadline` budget of ``TIME_BUDGET_S`` covers every
parse and verify of a completion; a completion that runs out scores 0. A gold answer gets ``GOLD_TIME_BUDGET_S``
(it is the dataset's, parsed once per group: a pause of a busy process must not make a sample unscorable); a
gold that runs out is unscorable.
Off the main thread signals are unavailable, so there the answer text is truncated to ``MAX_ANSWER_CHARS``
(done everywhere) and nothing else bounds it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from math_verify import parse, verify

from corrpo.rewards.answer import extract_answer
from corrpo.rewards.deadline import DeadlineExceeded, deadline

MAX_ANSWER_CHARS = 2_000
"""Answer text beyond this is cut before parsing, so garbage cannot make a step slow."""
TIME_BUDGET_S = 0.5
"""Seconds of math-verify work per completion, main thread only."""
GOLD_TIME_BUDGET_S = 5.0
"""Seconds of math-verify work per gold answer, main thread only (brace bombs never reach the parser)."""
MAX_NESTING = 32
"""Deeper bracket nesting is not an answer: scored 0 (a gold: unscorable) without parsing it at all."""


def too_deep(text: str, limit: int = MAX_NESTING) -> bool:
    """Whether ``(``/``[``/``{`` nest deeper than ``limit`` anywhere in ``text`` (unbalanced closers ignored).

    Brace bombs send the LaTeX parser (ANTLR) into deep recursion; interrupting it there by the deadline
    works, but can leave ANTLR's shared prediction caches half-updated and later parses slow, so such
    input never reaches it.
    """
    depth = 0
    for char in text:
        if char in "([{":
            depth += 1
            if depth > limit:
                return True
        elif char in ")]}" and depth:
            depth -= 1
    return False


class _NoTimeoutNotice(logging.Filter):
    """Drop math-verify's "Timeout is disabled" notice: the deadline above is that timeout."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutNotice())


def _wrap(text: str) -> str:
    """``$text$`` unless the text already has math delimiters, so that bare LaTeX (``\\frac12``) parses."""
    return text if "$" in text else f"${text}$"


def parse_gold(gold: Any) -> list | None:
    """The parsed gold answer, or None when math-verify finds no mathematical object in it."""
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        if not math.isfinite(gold):  # a NaN/inf gold (an empty cell of a numeric column) is no answer at all
            return None
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        return None
    if too_deep(gold):
        return None
    try:
        with deadline(GOLD_TIME_BUDGET_S):
            parsed = parse(_wrap(gold.strip()[:MAX_ANSWER_CHARS]), parsing_timeout=None)
    except (Exception, DeadlineExceeded):  # noqa: BLE001 - a gold math-verify cannot read is "unscorable"
        return None
    # With its default fallback math-verify returns the raw string when nothing parsed: not a usable gold.
    return parsed if any(not isinstance(item, str) for item in parsed) else None


def score_answer(gold: list, completion: Any) -> float:
    """1.0 if the completion's extracted answer verifies against the parsed gold, else 0.0; never raises."""
    return score_extracted(gold, extract_answer(completion))


def score_extracted(gold: list, answer: str | None) -> float:
    """:func:`score_answer` of a completion whose extracted answer text is ``answer``: it depends on nothing else."""
    if not answer:
        return 0.0
    answer = answer[:MAX_ANSWER_CHARS]
    if too_deep(answer):
        return 0.0
    try:
        with deadline(TIME_BUDGET_S):
            for candidate in dict.fromkeys((answer, _wrap(answer))):
                try:
                    prediction = parse(candidate, parsing_timeout=None)
                    if prediction and verify(gold, prediction, timeout_seconds=None):
                        return 1.0
                except Exception:  # noqa: BLE001 - garbage completions score 0, they never stop training
                    continue
    except DeadlineExceeded:
        pass
    return 0.0


def accuracy_reward(prompts: list[str], completions: list[Any], answer: list[str], **kwargs) -> list[float | None]:
    """Per completion: 1.0 if its answer equals the gold (math-verify), 0.0 if not or none was given, None
    if the gold itself cannot be parsed (the sample is unscorable, not wrong)."""
    if len(answer) != len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(answer)} gold answers")
    scores: list[float | None] = []
    parsed_golds: dict[str, list | None] = {}
    verdicts: dict[tuple[str, str | None], float] = {}
    for completion, gold in zip(completions, answer, strict=True):
        key = str(gold)
        if key not in parsed_golds:  # a GRPO group shares one gold: parse it once
            parsed_golds[key] = parse_gold(gold)
        parsed = parsed_golds[key]
        if parsed is None:
            scores.append(None)
            continue
        # the score is a function of (gold, extracted answer) alone, and a group's completions often give the
        # same answer: parse and verify each distinct pair once
        extracted = extract_answer(completion)
        if (key, extracted) not in verdicts:
            verdicts[key, extracted] = score_extracted(parsed, extracted)
        scores.append(verdicts[key, extracted])
    return scores
