"""The SFT -> RL phase schedule of a run, with the boundary predicate written once.

Batch ``i`` of a run is SFT while ``i < sft_steps`` and RL after; either phase may be empty. The module, the
callbacks and the data module all ask this object, so "is this the boundary" has one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PhaseSchedule:
    """``sft_steps`` SFT batches, then ``rl_steps`` RL batches."""

    sft_steps: int
    rl_steps: int

    @property
    def total(self) -> int:
        """Train batches in the whole run."""
        return self.sft_steps + self.rl_steps

    def phase_at(self, step: int) -> Literal["sft", "rl"]:
        """The phase of 0-based batch ``step``."""
        return "sft" if step < self.sft_steps else "rl"

    def rl_index(self, step: int) -> int:
        """0-based RL step of batch ``step`` (negative during SFT)."""
        return step - self.sft_steps

    def starts_rl(self, step: int) -> bool:
        """Batch ``step`` is the first RL batch (also in an RL-only run)."""
        return self.rl_steps > 0 and step == self.sft_steps

    @property
    def boundary_step(self) -> int | None:
        """The boundary's batch index (for figures), None when the run has no SFT -> RL boundary."""
        return self.sft_steps if self.is_boundary(self.sft_steps) else None

    def is_boundary(self, step: int) -> bool:
        """Batch ``step`` is the first RL batch of a run that trained SFT before it: the SFT -> RL boundary.

        Asked before batch ``step`` runs (the SFT-end evaluation, the dashboard marker) or after batch
        ``step - 1`` finished (the tracker's boundary probe): the same batch index either way.
        """
        return self.sft_steps > 0 and self.starts_rl(step)

    def shortened(self, batches_per_phase: int) -> PhaseSchedule:
        """At most ``batches_per_phase`` batches of each phase that has any: what ``trainer.fast_dev_run`` runs, so
        that a smoke test reaches the rollout, the rewards and the RL update (the run's first batches are all SFT)."""
        if batches_per_phase < 1:
            raise ValueError(f"batches_per_phase must be >= 1, got {batches_per_phase}")
        return PhaseSchedule(min(self.sft_steps, batches_per_phase), min(self.rl_steps, batches_per_phase))

    def steps_run(self, steps_done: int) -> dict[str, int]:
        """Batches of each phase among the first ``steps_done``: ``{"sft": ..., "rl": ...}``."""
        return {"sft": min(steps_done, self.sft_steps), "rl": min(max(steps_done - self.sft_steps, 0), self.rl_steps)}

    def stop_note(self, steps_done: int) -> str | None:
        """What a run that stopped after ``steps_done`` batches ran, in words (``"the run stopped after 4 of 6 SFT
        steps; RL never ran"``); None when it ran every batch."""
        if steps_done >= self.total:
            return None
        run = self.steps_run(steps_done)
        if run["sft"] < self.sft_steps:
            never = "; RL never ran" if self.rl_steps else ""
            return f"the run stopped after {run['sft']} of {self.sft_steps} SFT steps{never}"
        return f"the run stopped after {run['rl']} of {self.rl_steps} RL steps"
