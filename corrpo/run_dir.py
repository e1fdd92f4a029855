"""Where a run's files go: the logger's folder when there is one, else the trainer's root dir.

Everything a run writes (resolved config, wandb offline run, emergence.csv, results.json, the exported
policy) lands in this one folder, so a run can be read, reported or resumed from it alone.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder (created if missing)."""
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
