"""What :class:`corrpo.module.CorrPOModule` adjusts in, and reads from, the Lightning Trainer it runs in.

Five Lightning habits mislead on a run of two phases in one epoch, each put right here:

- ``trainer.fast_dev_run`` runs the run's first batch(es), all SFT: :func:`run_schedule` makes it a batch of each
  phase, so the smoke test reaches the rollout, the rewards and the RL update;
- Lightning logs every key that an earlier training step logged again at each step, with its last value (its per-step
  cache lives until the epoch ends): every RL row of the metrics repeated the last ``sft/loss``.
  :func:`forget_earlier_step_metrics` leaves a row with what its own step logged;
- a run that ends before its last batch (``max_steps``, ``max_time``, EarlyStopping) exits 0 like a finished one:
  :func:`phases_run` says so and gives results.json the steps each phase ran;
- under manual optimisation ``global_step`` counts ``optimizer.step()`` calls, so a skipped update (non-finite loss)
  was lost from it: :func:`count_skipped_update` counts it;
- a checkpoint of a run's last batch resumes as a finished epoch, so a run extended to more steps (``--extend``)
  trained nothing more: :func:`reopen_finished_epoch` lets it go on.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from corrpo.runs.code_version import code_version
from corrpo.runs.run_folder import method_name
from corrpo.training.config import RLConfig
from corrpo.training.phases import PhaseSchedule


def run_schedule(trainer: L.Trainer, schedule: PhaseSchedule) -> PhaseSchedule:
    """The phases ``trainer`` runs of the configured ``schedule``: all of them, or under ``trainer.fast_dev_run=n``
    (``true`` = 1) ``n`` batches of *each* phase (the data module streams the module's schedule). Lightning set
    ``limit_train_batches`` and ``max_steps`` to ``n``: the shortened run's batch count bounds it instead (an RL batch
    may make ``rl.num_iterations`` optimizer steps)."""
    if not trainer.fast_dev_run:
        return schedule
    short = schedule.shortened(int(trainer.fast_dev_run))
    trainer.limit_train_batches = short.total
    trainer.fit_loop.epoch_loop.max_steps = -1
    rank_zero_info(
        f"[corrpo] fast_dev_run: {short.sft_steps} SFT and {short.rl_steps} RL batch(es), the inversion probe once"
    )
    return short


def forget_earlier_step_metrics(trainer: L.Trainer) -> None:
    """Reset the per-step values that earlier training steps logged (called before each step), so each row of the
    metrics holds this step's keys only: ``sft/*`` in SFT steps, ``rl/*`` in RL steps. Plain tensors only: a
    torchmetrics state is never touched."""
    results = trainer._results  # Lightning's result collection: no public way to drop a key for one step
    if results is not None:
        results.reset(metrics=False, fx="training_step")


def stop_reason(trainer: L.Trainer) -> str:
    """Why the Trainer ended before the schedule's last batch, as far as it can tell."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return f"trainer.max_steps={trainer.max_steps}"
    if trainer.should_stop:
        return "a callback stopped it, e.g. EarlyStopping"
    return "trainer.max_time or trainer.limit_train_batches"


def phases_run(trainer: L.Trainer, schedule: PhaseSchedule, steps_done: int, sft_steps: int, rl: RLConfig) -> dict:
    """results.json's record of what ran after ``steps_done`` batches of ``schedule``: ``method`` (``sft-only``
    without an RL step, :func:`corrpo.runs.run_folder.method_name`), ``steps_run``, ``steps_planned`` (the configured
    ``sft_steps`` and ``rl.steps``: more than the schedule under fast_dev_run), ``stopped_early``, ``fast_dev_run``. A
    run stopped early warns ``the run stopped after N of M SFT steps; RL never ran (trainer.max_steps=N)``."""
    note = schedule.stop_note(steps_done)
    if note is not None:
        rank_zero_warn(f"{note} ({stop_reason(trainer)}); results.json records the steps run")
    steps_run = schedule.steps_run(steps_done)
    return {
        "method": method_name(rl, steps_run["rl"]),
        "steps_run": steps_run,
        "steps_planned": {"sft": sft_steps, "rl": rl.steps},
        "stopped_early": note is not None,
        "fast_dev_run": bool(trainer.fast_dev_run),
        "code_version": code_version(),
    }


def count_skipped_update(trainer: L.Trainer) -> None:
    """Count a skipped update as an optimizer step, as an applied one is counted: under manual optimisation Lightning's
    ``global_step`` is the number of ``optimizer.step()`` calls, so skips would silently shorten it (a run of 9
    updates whose last 3 were skipped saved ``last.ckpt`` at step 6, and every later checkpoint interval and
    ``trainer.max_steps`` shifted). ``skipped_updates`` in the metrics and results.json says how many were skipped."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress  # no public way to count a step
    progress.increment_ready()
    progress.increment_completed()


def reopen_finished_epoch(checkpoint: dict, steps_done: int, total_steps: int) -> None:
    """Let a checkpoint taken at a run's last batch continue when the run now has more steps (``--extend``).

    Lightning saved the train loop as "last batch fetched" (``is_last_batch``); restored, the epoch ends at once
    and ``max_epochs: 1`` ends the run, so an extension trained nothing. With steps left (``steps_done <
    total_steps``) that flag is cleared in the checkpoint before Lightning restores its loops: the epoch goes on at
    the next step, which the data module's step stream yields."""
    if steps_done >= total_steps:
        return
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if isinstance(progress, dict) and progress.get("is_last_batch"):
        progress["is_last_batch"] = False
