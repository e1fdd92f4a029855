"""The embedded offline reasoning task: chains of integer operations, evaluated left to right.

Why this task: it needs several dependent steps (so a model must carry state through its reasoning), it
has a verifiable integer answer, and a ~200k-parameter character-level transformer learns it within a few
hundred SFT steps on a CPU, so the whole SFT -> RL pipeline runs offline.

Format (one problem, ``"4 +3 *2 -5 ="``):

* prompt: the start number, then one ``" <op><operand>"`` group per operation, then ``" ="``. Each group
  applies to the running value, so the chain is read strictly left to right, like a calculator tape:
  ``4 +3 *2 -5`` means ``((4 + 3) * 2) - 5`` (there is no operator precedence; the space before every
  operator marks where a step begins).
* completion: one ``a<op>b=c`` step per operation, separated by single spaces, inside
  ``<think>...</think>``, then the result in ``<answer>...</answer>``:
  ``"<think>4+3=7 7*2=14 14-5=9</think><answer>9</answer>"``.
* answer: the final integer as a string, ``"9"``.

``render="words"`` tells the same chains as English word problems with a prose trace whose every step holds its
``a <op> b = c`` (:mod:`corrpo.data.word_problems`): same problems, same order, same splits, same answers.

Every intermediate value stays in ``0..max_value`` (steps that would leave it are never drawn), so the
numbers stay short. A problem belongs to exactly one split, fixed by a hash of its (digits) prompt, so "train",
"probe" and "test" never share a problem whatever the seed, the sizes asked for or the rendering.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

from corrpo.data.word_problems import ALPHABET as WORD_ALPHABET
from corrpo.data.word_problems import Step, word_record

SPLITS: tuple[str, ...] = ("train", "probe", "test")
_SUPPORTED_OPS = "+-*"
_MAX_REJECTS = 200_000
"""Consecutive draws that find no new problem of the split before the space is declared too small."""


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: ``probe`` and ``test`` get 10% of the hash space each, ``train`` 80%."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 10
    return "probe" if bucket == 0 else "test" if bucket == 1 else "train"


def _digits_record(start: int, chain: list[Step]) -> dict[str, str]:
    """The digits rendering of a chain: ``"4 +3 *2 -5 ="`` -> ``"<think>4+3=7 7*2=14 14-5=9</think>..."``."""
    prompt, trace, value = [str(start)], [], start
    for op, operand, result in chain:
        prompt.append(f"{op}{operand}")
        trace.append(f"{value}{op}{operand}={result}")
        value = result
    return {
        "prompt": " ".join(prompt) + " =",
        "completion": f"<think>{' '.join(trace)}</think><answer>{value}</answer>",
        "answer": str(value),
    }


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    return value * operand


@dataclass(frozen=True)
class ArithmeticTask:
    """Generator of multi-step arithmetic problems with step-by-step traces.

    Args:
        seed: seeds which problems are drawn (and their order); the split of a problem does not depend on it.
            None (the default): ``seed_everything``'s value in a data module, which fills it in; 0 alone.
        min_ops: fewest operations in a chain (the number is drawn uniformly from ``min_ops..max_ops``).
        max_ops: most operations in a chain.
        max_operand: operands and start numbers are drawn from ``1..max_operand``.
        ops: the operations used, a subset of ``"+-*"``.
        max_value: every intermediate (and final) value lies in ``0..max_value``.
        render: ``digits`` (``"4 +3 *2 -5 ="``, the default) or ``words`` (the same problems as English word
            problems with prose traces, :mod:`corrpo.data.word_problems`).
    """

    seed: int | None = None
    min_ops: int = 2
    max_ops: int = 4
    max_operand: int = 9
    ops: str = "+-*"
    max_value: int = 99
    render: Literal["digits", "words"] = "digits"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got min_ops={self.min_ops}, max_ops={self.max_ops}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not self.ops or set(self.ops) - set(_SUPPORTED_OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be distinct characters from {_SUPPORTED_OPS!r}, got {self.ops!r}")
        if self.max_value < self.max_operand:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_operand ({self.max_operand})")
        if self.render not in ("digits", "words"):
            raise ValueError(f"render must be 'digits' or 'words', got {self.render!r}")

    def alphabet(self) -> str:
        """Every character that can occur in a prompt or completion of this rendering, sorted (for a character
        tokenizer; both renderings are printable ASCII, which the default character tokenizer covers)."""
        if self.render == "words":
            return WORD_ALPHABET
        return "".join(sorted(set("0123456789+-*= <>/") | set("<think></think><answer></answer>")))

    def _valid_steps(self, value: int) -> dict[str, list[int]]:
        """Operation -> operands keeping ``value`` inside ``0..max_value``; ops with none are dropped."""
        steps = {}
        for op in self.ops:
            operands = [b for b in range(1, self.max_operand + 1) if 0 <= _apply(value, op, b) <= self.max_value]
            if operands:
                steps[op] = operands
        return steps

    def _chain(self, rng: random.Random) -> tuple[int, list[Step]]:
        """Draw one chain (whatever its split): the start, then per step an op, then an operand keeping the value
        in range. The only use of ``rng``: both renderings consume the problem stream identically."""
        start = value = rng.randint(1, self.max_operand)
        chain = []
        for _ in range(rng.randint(self.min_ops, self.max_ops)):
            steps = self._valid_steps(value)
            if not steps:  # cannot happen while max_value >= max_operand (+1 or *1 always fits); kept as a guard
                raise ValueError(f"no operation keeps {value} inside 0..{self.max_value}")
            op = rng.choice(sorted(steps))
            operand = rng.choice(steps[op])
            value = _apply(value, op, operand)
            chain.append((op, operand, value))
        return start, chain

    def _render(self, start: int, chain: list[Step], digits: dict[str, str]) -> dict[str, str]:
        return digits if self.render == "digits" else word_record(start, chain)

    def sample(self, rng: random.Random) -> dict[str, str]:
        """Draw one problem (whatever its split), rendered as :attr:`render` says."""
        start, chain = self._chain(rng)
        return self._render(start, chain, _digits_record(start, chain))

    def space_size(self) -> int:
        """The number of distinct problems (all splits together), counted exactly by dynamic programming."""
        counts = dict.fromkeys(range(1, self.max_operand + 1), 1)
        total = 0
        for n_ops in range(1, self.max_ops + 1):
            nxt: dict[int, int] = {}
            for value, count in counts.items():
                for op, operands in self._valid_steps(value).items():
                    for b in operands:
                        result = _apply(value, op, b)
                        nxt[result] = nxt.get(result, 0) + count
            counts = nxt
            if n_ops >= self.min_ops:
                total += sum(counts.values())
        return total

    def records(self, split: str, n: int) -> list[dict[str, str]]:
        """``n`` distinct problems of ``split``, deterministic in ``(seed, split)``.

        A larger ``n`` extends a smaller one (the first ``n`` records are the same).

        Raises:
            ValueError: unknown split, or fewer than ``n`` problems of this split exist.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > self.space_size():
            raise ValueError(
                f"arithmetic task has only {self.space_size()} problems in all splits, {n} asked for "
                f"{split!r}; raise max_ops, max_operand or max_value"
            )
        rng = random.Random(f"corrpo-arithmetic-{0 if self.seed is None else self.seed}-{split}")
        seen: set[str] = set()
        out: list[dict[str, str]] = []
        rejects = 0
        while len(out) < n:
            start, chain = self._chain(rng)
            record = _digits_record(start, chain)
            prompt = record["prompt"]  # the digits prompt: the split and the distinctness never depend on render
            if prompt in seen or split_of(prompt) != split:
                rejects += 1
                if rejects > _MAX_REJECTS:
                    raise ValueError(
                        f"arithmetic task: found only {len(out)} of {n} distinct {split!r} problems after "
                        f"{_MAX_REJECTS} draws without a new one; the problem space is too small "
                        "(raise max_ops, max_operand or max_value, or ask for fewer)"
                    )
                continue
            rejects = 0
            seen.add(prompt)
            out.append(self._render(start, chain, record))
        return out

    def corpus(self, n: int) -> list[str]:
        """The texts of the first ``n`` train records, each prompt and each completion a text of its own (as
        :func:`corrpo.models.batching.encode_sft_batch` tokenizes them): what a tokenizer for this task trains on."""
        return [text for record in self.records("train", n) for text in (record["prompt"], record["completion"])]
