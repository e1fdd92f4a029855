"""Hostile completions for the reward functions (benchmarks/reward_bombs.py, tests/test_hostile_inputs.py).

Garbage, brace bombs of every bracket kind, expressions whose evaluation explodes, and empty answers: each
must score 0 within a second and never raise. Here, not in tests/, because a benchmark imports nothing from tests/
(the tests reach this folder through tests/conftest.py).
"""

import random
import string


def _garbage(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.printable) for _ in range(n))


BOMBS = {
    "garbage_10k": _garbage(10_000, 0),
    "garbage_10k_in_answer_tags": "<answer>" + _garbage(10_000, 1) + "</answer>",
    "open_braces": "<answer>" + "{" * 10_000 + "</answer>",
    "nested_frac": "<answer>" + "\\frac{" * 3000 + "1" + "}" * 3000 + "</answer>",
    "nested_sqrt": "<answer>" + "\\sqrt{" * 2000 + "2" + "}" * 2000 + "</answer>",
    "nested_boxed": "\\boxed{" * 5000 + "1" + "}" * 5000,
    "nested_parens": "<answer>" + "(" * 5000 + "1" + ")" * 5000 + "</answer>",
    "nested_just_under_the_depth_limit": "<answer>" + "+".join(["(" * 30 + "1" + ")" * 30] * 60) + "</answer>",
    "power_tower": "<answer>" + "^".join(["9"] * 2000) + "</answer>",
    "huge_factorial": "<answer>(10^{10})!</answer>",
    "huge_integer": "<answer>" + "9" * 10_000 + "</answer>",
    "empty": "",
    "whitespace": " \n\t ",
    "empty_answer_tags": "<think></think><answer></answer>",
}
