"""The run's Weights & Biases loggers, for the callbacks that draw on the wandb page (tables, charts, summary).

One home for the lookup the dashboard and the inversion tracker share: the Trainer's WandbLoggers on rank 0, none on
other ranks (one process writes the page) and none when the run logs elsewhere (the callbacks then draw nothing);
and :func:`side_effect`, which makes a failed drawing a warning: a page is never worth a run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import lightning as L
from lightning.pytorch.loggers import WandbLogger


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    """The Trainer's WandbLoggers on the global-zero rank; an empty list on the other ranks."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []


@contextlib.contextmanager
def side_effect(what: str) -> Iterator[None]:
    """Run a logging side effect (a wandb table, an image, the run summary): an error in it (a media temp folder a
    cluster's ``/tmp`` cleaner removed: FileNotFoundError; a full disk; a wandb hiccup) is a warning naming ``what``,
    and training goes on."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure of a drawing is the drawing's, not the run's
        warnings.warn(f"{what} not logged ({type(error).__name__}: {error}); training goes on", stacklevel=3)
