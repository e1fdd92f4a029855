"""The arithmetic chains told as English word problems (``ArithmeticTask(render="words")``).

Why: the paper's phenomenon lives in natural-language reasoning, where a few tokens are genuinely uncertain (which
words to use: high entropy) and most are determined (the numbers once the wording is chosen: low entropy). The
digit chains have almost no free choices; told in words, the same chain has many.

Format, for the chain ``4 +3 *2 -5`` (the digits prompt ``"4 +3 *2 -5 ="``):

* prompt: an opening that states the start count of a person's objects, one clause per operation joined by
  connectives, and a question::

      Lena starts with 4 cookies. She finds 3 more. After that she doubles her cookies. Next, she sells 5.
      How many cookies does Lena have at the end?

* completion: an opening that restates the start, then one sentence per operation holding its arithmetic
  explicitly as ``a <op> b = c`` (spaces around ``+``, ``-``, ``*`` and ``=``), inside ``<think>...</think>``,
  then the final integer alone in ``<answer>...</answer>``::

      <think>At first Lena has 4 cookies. Finding 3 more gives 4 + 3 = 7. Doubling gives 7 * 2 = 14. Then she
      sells 5, so she has 14 - 5 = 9.</think><answer>9</answer>

  (this exact text is what the chain renders to; on one line: sentences are separated by single spaces, there is
  no newline). The ``a op b = c`` steps read in order are the chain: step ``i``'s ``a`` is step ``i-1``'s ``c``, so
  a trace is verifiable step by step.
* answer: the final integer as a string, ``"9"`` (the same as the digits rendering's).

Every wording choice (name, object, which template per clause and per trace sentence, connectives, question) is
drawn from a ``random.Random`` seeded by the chain itself (its digits prompt), never from the task's problem
stream: so words and digits records of a task are the same problems in the same order, and a chain always reads
the same way. The trace's phrasing is drawn independently of the prompt's, so a model cannot copy it: it must
choose (the uncertain tokens), while the numbers follow from the prompt (the determined ones). The operand of a
multiplication is always explicit: "doubles" is ``* 2``, "triples" ``* 3``, otherwise "multiplies ... by 4" or
"... 4 times as big". Text is plain ASCII (:data:`ALPHABET`), so the printable-ASCII character tokenizer covers it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

ALPHABET = "".join(sorted(set(string.ascii_letters + string.digits + " .,'?+-*=<>/")))
"""Every character a word problem can hold (a superset: all ASCII letters), sorted."""

Step = tuple[str, int, int]
"""One operation of a chain: ``(op, operand, result)``, e.g. ``("+", 3, 7)``."""

_SHE = "Mia Emma Olivia Ava Sofia Lena Zoe Chloe Nora Lucy Maya Ella Ruby Grace Hannah Iris Julia Tara Nina Rosa"
_HE = "Noah Liam Ben Leo Sam Omar Jack Theo Ethan Max Owen Ravi Hugo Felix Oscar Tom Kai Luis Adam Ivan"
NAMES: tuple[tuple[str, str], ...] = tuple((name, "she") for name in _SHE.split()) + tuple(
    (name, "he") for name in _HE.split()
)
"""(name, subject pronoun): 20 + 20."""

PRONOUNS = {"she": ("She", "her"), "he": ("He", "his")}
"""Subject pronoun -> (capitalised, possessive)."""

OBJECTS: tuple[tuple[str, str], ...] = tuple(
    tuple(pair.split("/"))
    for pair in (
        "apple/apples marble/marbles sticker/stickers coin/coins pencil/pencils book/books cookie/cookies "
        "stamp/stamps shell/shells card/cards balloon/balloons crayon/crayons button/buttons flower/flowers "
        "cupcake/cupcakes orange/oranges feather/feathers ribbon/ribbons rock/rocks candle/candles bead/beads "
        "ticket/tickets sock/socks plum/plums acorn/acorns pebble/pebbles marker/markers strawberry/strawberries "
        "peach/peaches box/boxes cherry/cherries puppet/puppets"
    ).split()
)
"""(singular, plural): 32 countable things."""

# Clauses per operation: (present tense for the prompt, gerund for the trace). {b}: the operand; {poss}: her/his;
# {obj}: the plural object.
CLAUSES: dict[str, tuple[tuple[str, str], ...]] = {
    "+": (
        ("buys {b} more", "buying {b} more"),
        ("finds {b} more", "finding {b} more"),
        ("gets {b} more", "getting {b} more"),
        ("picks up {b} more", "picking up {b} more"),
        ("receives {b} more", "receiving {b} more"),
        ("wins {b} more", "winning {b} more"),
        ("collects {b} more", "collecting {b} more"),
    ),
    "-": (
        ("gives {b} away", "giving {b} away"),
        ("loses {b}", "losing {b}"),
        ("sells {b}", "selling {b}"),
        ("gives {b} to a friend", "giving {b} to a friend"),
        ("uses up {b}", "using up {b}"),
        ("drops {b}", "dropping {b}"),
        ("trades away {b}", "trading away {b}"),
    ),
    "*": (
        ("multiplies {poss} {obj} by {b}", "multiplying by {b}"),
        ("makes {poss} pile {b} times as big", "making the pile {b} times as big"),
        ("grows {poss} pile to {b} times its size", "growing the pile to {b} times its size"),
    ),
}
NAMED_FACTORS: dict[int, tuple[tuple[str, str], ...]] = {
    2: (("doubles {poss} {obj}", "doubling"),),
    3: (("triples {poss} {obj}", "tripling"),),
}
"""Multiplications by 2 and 3 may also read "doubles" / "triples" (the factor is in the verb)."""

PROMPT_OPENINGS = ("{Name} has {n} {noun}.", "{Name} starts with {n} {noun}.", "{Name} owns {n} {noun}.",
                   "{Name} keeps {n} {noun} in a bag.")  # fmt: skip
CONNECTIVES = (", then {clause}", ", and then {clause}", ". Then {pron} {clause}", ". After that {pron} {clause}",
               ". Next, {pron} {clause}")  # fmt: skip
QUESTIONS = ("How many {obj} does {pron} have now?", "How many {obj} does {Name} have at the end?",
             "How many {obj} does {pron} end up with?", "How many {obj} does {Name} have in the end?")  # fmt: skip
TRACE_OPENINGS = ("{Name} starts with {n} {noun}.", "At first {Name} has {n} {noun}.", "{Name} begins with {n} {noun}.")
# Trace sentences per step: {Gerund}/{gerund} the clause as a gerund, {clause} in the present, {eq}: "a op b = c".
TRACE_STEPS = ("{Gerund} gives {eq}.", "After {gerund}, {pron} has {eq}.", "{Gerund} makes it {eq}.",
               "Then {pron} {clause}, so {pron} has {eq}.", "{Gerund} brings the count to {eq}.")  # fmt: skip
TRACE_STEPS_BY_OP = {"+": ("{Gerund} raises it to {eq}.",), "-": ("{Gerund} leaves {eq}.",),
                     "*": ("{Gerund} turns it into {eq}.",)}  # fmt: skip


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def word_record(start: int, steps: Sequence[Step]) -> dict[str, str]:
    """The word problem of the chain ``start`` then ``steps``: ``{"prompt", "completion", "answer"}``.

    The wording is a pure function of the chain (seeded by its digits prompt), see the module docstring.
    """
    if not steps:
        raise ValueError("a word problem needs at least one operation")
    key = " ".join([str(start), *(f"{op}{b}" for op, b, _ in steps)]) + " ="
    rng = random.Random(f"corrpo-words {key}")
    name, pron = rng.choice(NAMES)
    pron_cap, poss = PRONOUNS[pron]
    singular, obj = rng.choice(OBJECTS)
    who = dict(Name=name, pron=pron, poss=poss, obj=obj)
    noun = singular if start == 1 else obj
    clauses = []
    for op, b, _ in steps:
        choices = CLAUSES[op] + (NAMED_FACTORS.get(b, ()) if op == "*" else ())
        present, gerund = (text.format(b=b, **who) for text in rng.choice(choices))
        clauses.append((present, gerund))
    prompt = [rng.choice(PROMPT_OPENINGS).format(n=start, noun=noun, **who), f" {pron_cap} {clauses[0][0]}"]
    for present, _ in clauses[1:]:
        prompt.append(rng.choice(CONNECTIVES).format(clause=present, **who))
    prompt.append(". " + rng.choice(QUESTIONS).format(**who))
    trace = [rng.choice(TRACE_OPENINGS).format(n=start, noun=noun, **who)]
    value = start
    for (op, b, result), (present, gerund) in zip(steps, clauses, strict=True):
        template = rng.choice(TRACE_STEPS + TRACE_STEPS_BY_OP[op])
        eq = f"{value} {op} {b} = {result}"
        trace.append(template.format(Gerund=_capital(gerund), gerund=gerund, clause=present, eq=eq, **who))
        value = result
    return {
        "prompt": "".join(prompt),
        "completion": f"<think>{' '.join(trace)}</think><answer>{value}</answer>",
        "answer": str(value),
    }
