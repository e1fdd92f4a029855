"""ResumableCheckpoint: a ModelCheckpoint whose checkpoints always resume exactly, and survive crashes.

A corrpo run is one epoch of ``sft.steps + rl.steps`` batches, so a run stopped early (``max_steps``,
``max_time``, a callback setting ``trainer.should_stop``) ends its epoch early too. Stock ModelCheckpoint
then saves at that epoch end, and Lightning resumes such a checkpoint as a *finished* epoch: with
``max_epochs: 1`` nothing more is trained. This subclass saves at the batch where the run stops instead
(Lightning resumes a batch-end checkpoint mid-epoch, at the next batch) and skips the epoch-end and
train-end saves of a cut-short run. A finished run's final checkpoint is saved at its last batch's end too, never
at the epoch end: a resume of it (a run killed while exporting) then runs the run's end again (evaluation, export,
results.json) instead of Lightning's "max_epochs reached" with nothing written. It also silences Lightning's
manual-optimisation warning: saving the weights *after* the step is what resuming needs.

Crash safety, which stock Lightning lacks:

- **Atomic files.** Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: a temp file in
  ``$TMPDIR`` that is *moved* onto the target at commit. When ``$TMPDIR`` is another filesystem (a tmpfs, runs
  on NFS) that move is a truncating copy, so a kill during it leaves a 0-byte ``last.ckpt`` with the previous
  good one gone, and each crash leaves an orphan of the checkpoint's size in ``$TMPDIR``.
  :class:`AtomicCheckpointIO` writes a temp file beside the target (same folder, so same filesystem),
  fsyncs it, ``os.replace``-s it onto the target (atomic on POSIX) and fsyncs the folder: the target is
  always either the old checkpoint or the new one, whole. A failed write (disk full) removes its temp file;
  a killed one leaves ``.<name>.partial-<pid>`` in the checkpoint folder, which the next run's setup removes.
- **Signals.** SIGTERM (a scheduler's pre-emption) and SIGINT (Ctrl+C) set a flag; at the next step
  boundary the checkpoint is saved and the process exits with ``128 + signal`` (143, 130), so a scheduler
  sees a stopped run, not a finished one, and ``--ckpt_path last`` continues it exactly. A step that does not
  end (a hung reward) is stopped by a second SIGTERM / SIGINT or ``stop_grace_s`` seconds after the first, and
  the last step boundary's state is saved when the step applied no update yet (:mod:`callbacks.step_boundary`);
  a third signal interrupts at once. Under DDP the ranks agree on the flag each step (one all-reduce), since
  saving is a collective.
- **Finite weights.** A checkpoint whose weights hold NaN or inf is refused with
  :class:`corrpo.models.finite.NonFiniteWeightsError` (the update that made them so already stopped the run).
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from functools import partial

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.step_boundary import BoundarySnapshot, StopNow, StopWatchdog
from corrpo.models.finite import NonFiniteWeightsError, describe, nonfinite_tensors
from corrpo.runs.atomic import remove_leftovers, write_atomic
from corrpo.training.host import TrainingHost

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves ``path`` partial (:func:`corrpo.runs.atomic.write_atomic`: temp
    file beside it, fsync, ``os.replace``; on a failure the old target stays and no temp is left)."""
    write_atomic(path, partial(torch.save, obj))


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO for local paths whose save is :func:`atomic_torch_save` (remote URLs: Lightning's)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def _cut_short(pl_module: L.LightningModule) -> bool:
    """True when a corrpo run stopped before its last step. A module that is not a
    :class:`corrpo.training.host.TrainingHost` has no phases (this callback is then a plain ModelCheckpoint)."""
    return isinstance(pl_module, TrainingHost) and pl_module.steps_done < pl_module.schedule.total


def _last_step_done(pl_module: L.LightningModule) -> bool:
    """True when a corrpo run has just finished its last step: the batch end where its final checkpoint is saved."""
    return isinstance(pl_module, TrainingHost) and pl_module.steps_done == pl_module.schedule.total


class ResumableCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) that saves atomically, where a run stops early (never at a cut-short
    epoch end), and at the step boundary after SIGTERM / SIGINT before exiting ``128 + signal``.

    ``stop_grace_s``: seconds the step in flight gets after the first signal before it is stopped and the last
    step boundary saved (a second signal stops it at once); keep it under the scheduler's kill delay (Slurm's
    KillWait is 30 s by default)."""

    def __init__(self, *args, stop_grace_s: float = 20.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0 < stop_grace_s < float("inf"):
            raise ValueError(
                f"ResumableCheckpoint.stop_grace_s must be a positive number of seconds, got {stop_grace_s!r}"
            )
        self.stop_grace_s = stop_grace_s
        self.stop_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}
        self._watchdog: StopWatchdog | None = None
        self._stopping_now = False
        self._boundary: BoundarySnapshot | None = None
        self._loaded_rng: dict | None = None

    # ----------------------------------------------------------------------------------- atomic files
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO is kept
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath:
            for path in remove_leftovers(self.dirpath):
                warnings.warn(f"removed {path}: the temp file of a checkpoint save that was killed", stacklevel=2)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Refuse any checkpoint whose weights hold NaN or inf (every save goes through here, this callback's or
        another's): resuming it would only skip every update. The ranks agree, so all of them raise."""
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}).items())
        if not trainer.strategy.reduce_boolean_decision(not bad, all=True):
            raise NonFiniteWeightsError(
                f"refusing to save a checkpoint at global step {trainer.global_step}: {len(bad) or 'some'} weight "
                f"tensor(s) hold NaN or inf ({describe(bad) if bad else 'on another rank'}); the last checkpoint "
                "saved before this one is the run's last finite state"
            )

    # ---------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame) -> None:
        if self._stopping_now:
            raise KeyboardInterrupt  # a third signal: stop at once, even a save in progress (it is atomic)
        if self.stop_signal is not None:
            self._stopping_now = True  # a second signal, or the grace period is over: stop this step now
            raise StopNow(self.stop_signal)
        self.stop_signal = signum
        name = signal.Signals(signum).name
        print(
            f"[corrpo] {name} received: saving a checkpoint at the end of this step, then exiting (a second signal, "
            f"or {self.stop_grace_s:g} s, stops the step and saves the last step boundary)",
            flush=True,
        )
        self._watchdog = StopWatchdog(signum, self.stop_grace_s)

    # ------------------------------------------------------------------------------- step boundaries
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._loaded_rng = checkpoint.get("corrpo", {}).get("rng")  # the boundary a resumed run starts from

    def _mark_boundary(self, trainer, pl_module, rng: dict | None = None) -> None:
        if self._previous_handlers:
            self._boundary = BoundarySnapshot.take(trainer, pl_module, rng)

    def _save_boundary(self, trainer, pl_module, exception: StopNow) -> None:
        """After :class:`StopNow`: save the last step boundary's state if the step applied no update, else say
        why not and where ``--ckpt_path last`` resumes from."""
        problem = "no step boundary recorded" if self._boundary is None else self._boundary.rewind_problem(trainer)
        if problem is None:
            if self._watchdog is not None:
                self._watchdog.saving()
            self._boundary.rewind(trainer, pl_module)
            self._save_here(trainer)
            print(f"[corrpo] step stopped; the last step boundary (global step {trainer.global_step}) is saved in "
                  f"{self.dirpath}", flush=True)  # fmt: skip
        elif trainer.is_global_zero:
            print(f"[corrpo] step stopped; no new checkpoint ({problem}); --ckpt_path last resumes from "
                  f"{self.last_model_path or 'the start'}", flush=True)  # fmt: skip

    def on_train_start(self, trainer, pl_module) -> None:
        self.stop_signal, self._stopping_now = None, False
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._mark_boundary(trainer, pl_module, self._loaded_rng)

    def _restore_signal_handlers(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _agreed_stop_signal(self, trainer) -> int | None:
        """This rank's signal, or under DDP the largest any rank received (saving needs every rank)."""
        if trainer.world_size == 1:
            return self.stop_signal
        flag = torch.tensor(float(self.stop_signal or 0), device=trainer.strategy.root_device)
        agreed = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return agreed or None

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, StopNow):
            self._save_boundary(trainer, pl_module, exception)
        self._restore_signal_handlers()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_signal_handlers()
        super().teardown(trainer, pl_module, stage)

    # ------------------------------------------------------------------------------------ where to save
    def _save_here(self, trainer) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            signum = self._agreed_stop_signal(trainer) if self._previous_handlers or trainer.world_size > 1 else None
            if signum is not None:
                if self._watchdog is not None:
                    self._watchdog.saving()
                self._save_here(trainer)
                self._restore_signal_handlers()
                raise SystemExit(128 + signum)  # Lightning tears down and re-raises: the process exits 143 / 130
        max_steps_reached = trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps
        stopping = trainer.should_stop or max_steps_reached
        if stopping and _cut_short(pl_module) or _last_step_done(pl_module):
            self._save_here(trainer)  # the final checkpoint: at a batch end, so a resume of it runs the run's end
        self._mark_boundary(trainer, pl_module)  # the generators as a checkpoint saved here stores them

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if isinstance(pl_module, TrainingHost):
            return  # saved at the last batch's end: an epoch-end checkpoint resumes as a finished loop, with no end
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # a fast_dev_run saves nothing
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_signal_handlers()
        # Lightning's would save last.ckpt under fast_dev_run, and a finished loop's after a run resumed at its end
        if not isinstance(pl_module, TrainingHost) and not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)
