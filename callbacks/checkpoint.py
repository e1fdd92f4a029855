"""ResumableCheckpoint: a ModelCheckpoint whose ``last.ckpt`` always resumes exactly.

A corrpo run is one epoch of ``sft.steps + rl.steps`` batches, so a run stopped early (``max_steps``,
``max_time``, a callback setting ``trainer.should_stop``) ends its epoch early too. Stock ModelCheckpoint
then saves at that epoch end, and Lightning resumes such a checkpoint as a *finished* epoch: with
``max_epochs: 1`` nothing more is trained. This subclass saves at the batch where the run stops instead
(Lightning resumes a batch-end checkpoint mid-epoch, at the next batch) and skips the epoch-end and
train-end saves of a cut-short run. It also silences Lightning's manual-optimisation warning: saving the
weights *after* the step is what resuming needs.

It also installs :class:`StreamingCheckpointIO` in place of Lightning's default checkpoint writer, which first
serialises the whole checkpoint into an in-memory buffer: weights + AdamW moments (12 bytes a parameter) a second
time in RAM at every save (with a 0.5B model, 6 GB on top of the run's 8.6 GB).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from corrpo.training.host import TrainingHost


def _cut_short(pl_module: L.LightningModule) -> bool:
    """True when a corrpo run stopped before its last step. A module that is not a
    :class:`corrpo.training.host.TrainingHost` has no phases (this callback is then a plain ModelCheckpoint)."""
    return isinstance(pl_module, TrainingHost) and pl_module.steps_done < pl_module.schedule.total


class StreamingCheckpointIO(TorchCheckpointIO):
    """``torch.save`` straight into a temporary file beside the target, then an atomic rename (local paths): no
    in-memory copy of the checkpoint. Other filesystems (object stores) keep Lightning's buffered write."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        torch.save(checkpoint, partial)
        os.replace(partial, path)  # a reader never sees a half-written checkpoint


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) that also saves where a run stops early, never at a cut-short epoch end."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default; a user's own IO is kept
            trainer.strategy.checkpoint_io = StreamingCheckpointIO()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        max_steps_reached = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        stopping = trainer.should_stop or max_steps_reached
        if stopping and _cut_short(pl_module) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if _cut_short(pl_module):
            return
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # last.ckpt = the finished run

    def on_train_end(self, trainer, pl_module) -> None:
        if not _cut_short(pl_module):
            super().on_train_end(trainer, pl_module)
