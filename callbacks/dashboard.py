"""WandbDashboard: what a researcher wants on the run page beyond the scalars.

- a **completions table** every ``every_n_steps`` RL steps (and at the last one): prompt, completion, each
  reward part, the total reward, the advantage and ``rho_i`` (the response's own entropy-strength
  correlation, NaN without the CorR-PO term), ``max_rows`` rows from rank 0's batch;
- the **phase boundary** marked: ``phase/boundary_step`` in the summary and a ``phase/boundary`` = 1 point at
  the SFT->RL step (``phase`` itself is logged every step by the module, 0 = SFT, 1 = RL);
- the **final figures** in the run summary: ``final/inversion_spearman_{start,boundary,end}`` from the
  :class:`callbacks.inversion.InversionTracker`, ``final/test_accuracy_{start,sft_end,end}``,
  ``final/skipped_updates``.

Each of these is a side effect: one that fails (a wandb media temp folder removed mid-run, a full disk) is a warning
(:func:`callbacks.loggers.side_effect`), never the end of training.

Every scalar logged by corrpo goes through Lightning's WandbLogger, which plots it against
``trainer/global_step``, so the inversion curve shares its x-axis with loss and reward. Without a
WandbLogger this callback does nothing.
"""

from __future__ import annotations

import math

import lightning as L

from callbacks.inversion import InversionTracker
from callbacks.loggers import side_effect, wandb_loggers
from corrpo.training.host import require_host

TEXT_CHARS = 2000  # long completions are cut in the table (the row count is the budget that matters)


class WandbDashboard(L.Callback):
    """Completions table, phase-boundary marker and final summary figures on the wandb run.

    Args:
        every_n_steps: log the completions table every this many RL steps (and at the last RL step).
        max_rows: completions per table (the first rows of rank 0's batch: whole groups first).
    """

    def __init__(self, every_n_steps: int = 10, max_rows: int = 64) -> None:
        if every_n_steps < 1 or max_rows < 1:
            raise ValueError("WandbDashboard.every_n_steps and max_rows must be >= 1")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows

    def setup(self, trainer, pl_module, stage: str) -> None:
        require_host(pl_module, "WandbDashboard")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.schedule.is_boundary(batch["step"]):
            for logger in wandb_loggers(trainer):
                with side_effect("the phase boundary marker"):
                    logger.log_metrics({"phase/boundary": 1.0}, step=trainer.global_step)
                    logger.experiment.summary["phase/boundary_step"] = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch["phase"] != "rl":
            return
        rl_step = pl_module.schedule.rl_index(batch["step"]) + 1  # 1-based count of finished RL steps
        if rl_step % self.every_n_steps and rl_step != pl_module.schedule.rl_steps:
            return
        rows = pl_module.last_completions[: self.max_rows]
        loggers = wandb_loggers(trainer)
        if not rows or not loggers:
            return
        columns = list(rows[0])
        data = [[_cell(row[c]) for c in columns] for row in rows]
        for logger in loggers:
            with side_effect(f"the completions table of global step {trainer.global_step}"):
                logger.log_table(key="completions", columns=columns, data=data, step=trainer.global_step)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # teardown, not on_train_end: the end-of-training accuracy and inversion are measured in other
        # on_train_end hooks (the module's, the tracker's), which may run after this callback's.
        loggers = wandb_loggers(trainer)
        if stage != "fit" or not loggers:
            return
        summary = {f"final/test_accuracy_{e['when']}": e["accuracy"] for e in pl_module.eval_history}
        summary["final/skipped_updates"] = pl_module.skipped_updates
        for callback in trainer.callbacks:
            if isinstance(callback, InversionTracker):
                for row in callback.rows:
                    if row["event"] in ("start", "boundary", "end"):
                        summary[f"final/inversion_spearman_{row['event']}"] = row["spearman"]
                        summary[f"final/inversion_pearson_{row['event']}"] = row["pearson"]
        for logger in loggers:
            with side_effect("the final summary figures"):
                logger.experiment.summary.update(summary)


def _cell(value):
    """Table cells: text cut to ``TEXT_CHARS``, NaN kept as None (wandb tables reject NaN in some versions)."""
    if isinstance(value, str):
        return value[:TEXT_CHARS]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
