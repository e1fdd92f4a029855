"""Progress bars: one per training phase with its own ETA, and one for each evaluation / fingerprint pass.

Lightning's bar is one "Epoch 0" over the whole run, whose ETA mixes fast SFT steps with slow RL steps (each
RL step generates ``G`` completions per prompt): it is wrong for most of the run. :class:`PhaseProgressBar` opens
a bar ``SFT`` over ``sft.steps`` batches and then a bar ``RL`` over ``rl.steps``, each with its own rate and ETA,
and starts at ``steps_done`` on resume. The CLI installs it whenever ``trainer.enable_progress_bar`` is on.

:func:`eval_progress` is a short-lived bar for work done inside a hook (the start / SFT-end / end evaluations,
``corrpo validate``'s fingerprint), shown only when the trainer shows a progress bar, on rank 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n


class PhaseProgressBar(TQDMProgressBar):
    """A bar per phase (``SFT``, then ``RL``), each over its own number of batches, with its own ETA."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._phase: str | None = None
        self._phase_start = 0

    def on_train_start(self, *_: Any) -> None:
        self._phase = None  # the bar opens with the first batch, when its phase is known

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        pass  # no "Epoch 0" bar: one run is one epoch of step batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        phase = batch["phase"]
        if phase == self._phase:
            return
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()
        schedule = pl_module.schedule
        total, start = (schedule.sft_steps, 0) if phase == "sft" else (schedule.rl_steps, schedule.sft_steps)
        self.train_progress_bar = Tqdm(
            desc=phase.upper(),
            total=total,
            initial=batch["step"] - start,  # a resumed run's bar starts where it stopped
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )
        self._phase, self._phase_start = phase, start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self._train_progress_bar
        n = batch["step"] - self._phase_start + 1
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._train_progress_bar is not None and not self._train_progress_bar.disable:
            self._train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, *_: Any) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()


def _shows_progress(trainer) -> bool:
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    return isinstance(bar, TQDMProgressBar) and not bar.is_disabled and trainer.is_global_zero


@contextmanager
def eval_progress(trainer, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A bar ``description`` over ``total`` items while the block runs; yields ``advance(n)``. A no-op when the
    trainer shows no progress bar (tests, ``enable_progress_bar: false``, ranks > 0)."""
    if not _shows_progress(trainer):
        yield lambda n: None
        return
    bar = Tqdm(desc=description, total=total, leave=False, dynamic_ncols=True, file=sys.stdout, smoothing=0)
    try:
        yield bar.update
    finally:
        bar.close()
