"""Stopping in the middle of a step: the state of the last step boundary, and a watchdog for a step that never ends.

The first SIGTERM / SIGINT asks :class:`callbacks.checkpoint.ResumableCheckpoint` to save at the end of the step.
A step that does not end (a reward that hangs, a generation that runs for an hour) used to leave the process
alive forever after "saving a checkpoint at the end of this step". Now a second signal, or ``stop_grace_s``
seconds after the first (the :class:`StopWatchdog` re-sends the signal to the main thread), raises
:class:`StopNow` in the main thread wherever it is, and the callback saves the state of the **last step
boundary** before the process exits ``128 + signal``:

- no optimizer step ran in the aborted batch (a hang in the rollout, a reward, the CorR-PO term): the weights
  and the optimizer are still the boundary's. What the batch did change is put back (:class:`BoundarySnapshot`):
  the random generators (as the boundary's checkpoint would have stored them), the module's evaluation lists,
  and Lightning's batch counters (as they read in the previous batch's ``on_train_batch_end``, where checkpoints
  are saved). ``--ckpt_path last`` then redoes the aborted batch, exactly as after a regular save.
- an update already ran in the batch (or this is a multi-process run, where saving is a collective the other
  ranks are not in, or no batch finished yet): nothing is saved; the message names the newest checkpoint.

When even the re-sent signal cannot land (the main thread inside one C call that never returns to Python),
the watchdog ends the process with ``os._exit(128 + signal)`` ``stop_grace_s`` seconds later, unless a save has
started; the newest periodic checkpoint is then the resume point.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

from corrpo.training.rng import restore_rng_states, rng_states

EVAL_LISTS = ("eval_history", "eval_results")
"""The module's evaluation lists that a boundary checkpoint stores (a batch-start evaluation appends to them)."""


class StopNow(SystemExit):  # noqa: N818 - an exit, like SystemExit
    """Raised in the main thread by a second SIGTERM / SIGINT or at the end of the grace period: stop this step now.

    A ``SystemExit`` (code ``128 + signal``) so that the CLI exits with the signal's code; a reward's own
    ``sys.exit`` is a plain ``SystemExit`` and is told apart (:mod:`corrpo.rewards.combine`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@dataclass
class BoundarySnapshot:
    """What a checkpoint saved at the last step boundary would hold that a batch in flight may have changed."""

    rng: dict | None
    """The random generators at the boundary (as the module's ``on_save_checkpoint`` would have stored them)."""
    global_step: int
    """Optimizer steps at the boundary: a batch that stepped since cannot be rewound."""
    eval_lengths: dict[str, int]
    """Length of each of :data:`EVAL_LISTS` at the boundary."""

    @classmethod
    def take(cls, trainer, pl_module, rng: dict | None = None) -> BoundarySnapshot:
        """The boundary now (``rng``: generator states to record instead of the current ones, e.g. a checkpoint's)."""
        lists = {name: getattr(pl_module, name, None) for name in EVAL_LISTS}
        lengths = {name: len(value) for name, value in lists.items() if isinstance(value, list)}
        return cls(rng if rng is not None else rng_states(), trainer.global_step, lengths)

    def rewind_problem(self, trainer) -> str | None:
        """Why the trainer cannot be put back to this boundary; None when it can."""
        if trainer.world_size > 1:
            return "a multi-process run (saving is a collective the other ranks are not in)"
        if trainer.global_step != self.global_step:
            return "an update was already applied in the interrupted step"
        if trainer.fit_loop.epoch_loop.batch_progress.total.completed < 1:
            return "no step had finished"
        return None

    def rewind(self, trainer, pl_module) -> None:
        """Put the in-flight batch's changes back: generators, evaluation lists, Lightning's batch counters (as in
        the previous batch's ``on_train_batch_end``: ready = started = processed = completed + 1)."""
        if self.rng is not None:
            restore_rng_states(self.rng)
        for name, length in self.eval_lengths.items():
            del getattr(pl_module, name)[length:]
        loop = trainer.fit_loop.epoch_loop
        for counters in (loop.batch_progress.total, loop.batch_progress.current):
            done = counters.completed
            counters.ready = counters.started = counters.processed = done
            counters.completed = done - 1
        loop.batch_progress.is_last_batch = False
        loop._batches_that_stepped = max(loop._batches_that_stepped - 1, 0)


class StopWatchdog:
    """After ``grace_s``: re-send ``signum`` to the main thread (raising :class:`StopNow` there); ``grace_s`` later,
    unless :meth:`saving` was called, ``os._exit(128 + signum)``. :meth:`cancel` stops it."""

    def __init__(self, signum: int, grace_s: float) -> None:
        self.signum, self.grace_s = signum, grace_s
        self._done = threading.Event()
        self._saving = False
        self._thread = threading.Thread(target=self._run, name="corrpo-stop-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._done.wait(self.grace_s) or self._saving:
            return
        print(f"[corrpo] the step did not end within stop_grace_s={self.grace_s}s: stopping it now", flush=True)
        signal.pthread_kill(threading.main_thread().ident, self.signum)
        if self._done.wait(self.grace_s) or self._saving:
            return
        print(
            f"[corrpo] the main thread did not respond within another {self.grace_s}s (stuck in native code): exiting "
            f"{128 + self.signum} without a new checkpoint; --ckpt_path last resumes from the newest one",
            flush=True,
        )
        time.sleep(0.1)
        os._exit(128 + self.signum)

    def saving(self) -> None:
        """A save has started: never end the process under it."""
        self._saving = True
        self._done.set()

    def cancel(self) -> None:
        self._done.set()
