"""The run's Weights & Biases loggers, for the callbacks that draw on the wandb page (tables, charts, summary).

One home for the lookup the dashboard and the inversion tracker share: the Trainer's WandbLoggers on rank 0, none on
other ranks (one process writes the page) and none when the run logs elsewhere (the callbacks then draw nothing).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import WandbLogger


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The Trainer's WandbLoggers on the global-zero rank; an empty list on the other ranks."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []
