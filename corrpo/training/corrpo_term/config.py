"""``rl.inversion``: the CorR-PO term's settings, validated at construction (errors name ``rl.inversion.<key>``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from corrpo.inversion.strength_config import REWARD_STRENGTH_DEFAULTS, StrengthConfig, strength_spec
from corrpo.models.finite import require_finite_fields

CORRELATIONS = ("spearman", "pearson")
APPLY_MODES = ("reward", "advantage")


@dataclass
class CorrPOTermConfig:
    """``rl.inversion``: the CorR-PO term ``lambda * clip(-rho_i, -1, 1)``, entered in each response's reward or
    advantage (``apply``); ``log_only`` scores it under plain GRPO as the control."""

    coef: float = 0.0
    """``lambda``, the bonus weight; 0 = plain GRPO (no scoring pass at all unless ``log_only``)."""
    apply: Literal["reward", "advantage"] = "reward"
    """Where the term enters. ``reward``: ``lambda * clip(-rho_i, -1, 1)`` is added to the reward before the group
    normalisation (so a group whose task rewards are all equal gets the bonus alone at unit scale, whatever lambda).
    ``advantage``: ``lambda`` times the bonus standardised over the batch's valid responses is added to the
    normalised task advantage, so lambda weighs the term against the task signal in every group (docs/corrpo.md)."""
    log_only: bool = False
    """The control: score and log the per-response correlations (``rl/inversion/rollout_*``) under plain GRPO,
    rewards, advantages and weights untouched (needs ``coef: 0``): what GRPO alone does to the statistic CorR-PO
    rewards."""
    warmup_steps: int = 0
    """``lambda`` ramps linearly from 0 to ``coef`` over the first ``warmup_steps`` RL steps."""
    correlation: Literal["spearman", "pearson"] = "spearman"
    """``spearman`` (the headline) or ``pearson``."""
    strength: StrengthConfig = field(default_factory=lambda: StrengthConfig(**REWARD_STRENGTH_DEFAULTS))
    """The gradient strength ``S_t`` (:class:`corrpo.inversion.strength_config.StrengthConfig`); its default
    projections are ``[q, v, o]`` (``REWARD_STRENGTH_DEFAULTS``: K is the costly closed form)."""
    min_tokens: int = 8
    """Responses with fewer scored completion tokens get no bonus (too noisy a correlation)."""
    center: bool = False
    """Subtract the mean bonus over each group's valid members (invalid members stay 0)."""
    shared_forward: bool = True
    """Score the term on the update's OWN forward when that is exact (``method: onepass``, the update in one
    micro-batch, no active dropout, no gradient checkpointing): the same bonus without a forward of its own.
    False: always a separate scoring pass (the reference the shared one is tested against)."""
    rows_per_chunk: int | None = None
    """Responses per scoring forward/backward (bounds the scoring pass's memory: its logits are
    ``rows x sequence x vocabulary``); None = ``rl.micro_batch_size``, or 64 when that is unset too."""

    def __post_init__(self) -> None:
        require_finite_fields(self, "rl.inversion")
        if isinstance(self.coef, bool) or not isinstance(self.coef, int | float) or not math.isfinite(self.coef):
            raise ValueError(f"rl.inversion.coef must be a finite number, got {self.coef!r}")
        if self.coef < 0:
            raise ValueError(f"rl.inversion.coef must be >= 0 (0 = plain GRPO), got {self.coef!r}")
        for key in ("warmup_steps", "min_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"rl.inversion.{key} must be an int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"rl.inversion.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_tokens < 2:
            raise ValueError(
                f"rl.inversion.min_tokens must be >= 2 (a correlation needs 2 tokens), got {self.min_tokens}"
            )
        if self.apply not in APPLY_MODES:
            raise ValueError(f"rl.inversion.apply must be one of {APPLY_MODES}, got {self.apply!r}")
        if not isinstance(self.log_only, bool):
            raise ValueError(f"rl.inversion.log_only must be true or false, got {self.log_only!r}")
        if self.log_only and self.coef > 0:
            raise ValueError(
                f"rl.inversion.log_only scores the term without applying it, but rl.inversion.coef is {self.coef}: "
                "set coef to 0 for the control, or log_only to false for CorR-PO"
            )
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"rl.inversion.correlation must be one of {CORRELATIONS}, got {self.correlation!r}")
        if not isinstance(self.shared_forward, bool):
            raise ValueError(f"rl.inversion.shared_forward must be true or false, got {self.shared_forward!r}")
        rows = self.rows_per_chunk
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"rl.inversion.rows_per_chunk must be a positive int or null, got {rows!r}")
        self.strength = strength_spec(self.strength, "rl.inversion.strength", REWARD_STRENGTH_DEFAULTS)

    @property
    def scored(self) -> bool:
        """Whether an RL step scores the term at all: CorR-PO (``coef > 0``) or the control (``log_only``)."""
        return self.coef > 0 or self.log_only

    def coef_at(self, rl_step: int) -> float:
        """``lambda`` at 0-based RL step ``rl_step``: ``coef * min(1, rl_step / warmup_steps)``.

        0 at the first RL step, ``coef`` from step ``warmup_steps`` on (at once when ``warmup_steps = 0``).
        The ramp lets the group statistics of the task reward settle before the bonus competes with them.
        """
        if self.warmup_steps <= 0:
            return float(self.coef)
        return float(self.coef) * min(1.0, max(rl_step, 0) / self.warmup_steps)
