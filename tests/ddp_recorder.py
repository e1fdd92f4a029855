"""A test-only callback for tests/test_ddp.py: each rank writes what it trained on, one json line per step.

Imported by the DDP subprocesses (``PYTHONPATH=tests``); ``GroupRecorder`` writes
``<run_dir>/steps-rank<r>.jsonl`` rows ``{step, phase, rank, prompts, completion_prompts}``, where
``completion_prompts`` is the prompt of every completion this rank sampled in an RL step. It also writes
``<run_dir>/eval-rank<r>.jsonl``, one line per test-accuracy evaluation: how many prompts this rank decoded.
"""

import json

import lightning as L

from corrpo.runs.run_folder import run_dir


class GroupRecorder(L.Callback):
    def setup(self, trainer, pl_module, stage) -> None:
        count = pl_module.evaluator.accuracy_counts

        def counted(records, *args, **kwargs):
            with (run_dir(trainer) / f"eval-rank{trainer.global_rank}.jsonl").open("a") as handle:
                handle.write(json.dumps({"decoded": len(records)}) + "\n")
            return count(records, *args, **kwargs)

        pl_module.evaluator.accuracy_counts = counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {"step": batch["step"], "phase": batch["phase"], "rank": trainer.global_rank, "prompts": batch["prompt"]}
        if batch["phase"] == "rl":
            row["completion_prompts"] = [r["prompt"] for r in pl_module.last_completions]
            row["rho"] = [r["rho"] for r in pl_module.last_completions]
            row["bonus"] = [r.get("reward/inversion", 0.0) for r in pl_module.last_completions]
        with (run_dir(trainer) / f"steps-rank{trainer.global_rank}.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
