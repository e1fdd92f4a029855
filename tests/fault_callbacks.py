"""Test-only callback that signals its own process at a chosen step, as a scheduler or a Ctrl+C would."""

import os

import lightning as L


class SignalAt(L.Callback):
    """Send ``signum`` to this process as step ``step`` starts (``--trainer.callbacks+=`` by class path)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch["step"] == self.step:
            os.kill(os.getpid(), self.signum)
