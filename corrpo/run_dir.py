"""Where a run's files go: the logger's folder when there is one, else the trainer's root dir.

Everything a run writes (resolved config, wandb offline run, emergence.csv, results.json, the exported
policy) lands in this one folder, so a run can be read, reported or resumed from it alone.

Not ``trainer.log_dir``: that property broadcasts from rank 0 (a collective), and the callers here run on
rank 0 only, so under DDP it would pair with whatever collective the other ranks run next and deadlock.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder (created if missing); the same rule as ``trainer.log_dir``, without its broadcast."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        folder = logger.log_dir
    else:
        folder = (logger.save_dir if logger is not None else None) or trainer.default_root_dir
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder
