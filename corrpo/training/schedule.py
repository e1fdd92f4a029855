"""Learning-rate schedule of a phase: linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""

from __future__ import annotations

import math


def warmup_cosine_lr(lr: float, step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 1.0) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of a phase of ``total_steps`` steps.

    ``lr * (step + 1) / warmup_steps`` during warm-up; then ``lr * (m + (1 - m) * (1 + cos(pi * p)) / 2)``
    with ``p`` the fraction of the post-warm-up steps done and ``m = min_lr_ratio`` (1 = constant).
    Small models trained briefly end markedly better with the decay; RL usually keeps it constant.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
