"""Time the rewards on hostile completions: every one must score 0 within 1 s (issue: hostile inputs).

For each completion of ``benchmarks/hostile_completions.py`` it times ``accuracy_reward`` + ``format_reward``
(gold ``42``) ``--repeats`` times and prints the worst time, the score, and the ratio to a plain right
answer measured in the same run. Usage::

    python benchmarks/reward_bombs.py [--repeats 3]

The last line is ``RESULT worst_s=<seconds> over_budget=<count of completions above 1 s>``.
"""

from __future__ import annotations

import argparse
import time

from hostile_completions import BOMBS

from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.format import format_reward

BUDGET_S = 1.0


def worst_time(completion: str, repeats: int) -> tuple[float, float]:
    worst, score = 0.0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        score = accuracy_reward(["p"], [completion], answer=["42"])[0] + format_reward(["p"], [completion])[0]
        worst = max(worst, time.perf_counter() - start)
    return worst, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    baseline, _ = worst_time("<think>40+2=42</think><answer>42</answer>", args.repeats)
    print(f"{'completion':36s} {'chars':>6s} {'worst s':>8s} {'x right answer':>15s} {'score':>6s}")
    print(f"{'(a right answer, baseline)':36s} {41:6d} {baseline:8.3f} {1.0:15.1f} {2.0:6.1f}")
    worst_all, over = 0.0, 0
    for name, completion in BOMBS.items():
        worst, score = worst_time(completion, args.repeats)
        worst_all, over = max(worst_all, worst), over + (worst > BUDGET_S)
        print(f"{name:36s} {len(completion):6d} {worst:8.3f} {worst / baseline:15.1f} {score:6.1f}")
    print(f"RESULT worst_s={worst_all:.3f} over_budget={over}")


if __name__ == "__main__":
    main()
