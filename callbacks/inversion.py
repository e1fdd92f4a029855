"""InversionTracker: measure the entropy-gradient inversion on a fixed probe set as training runs.

At the start, every ``every_n_steps`` batches, at the SFT->RL boundary and at the end (under ``trainer.fast_dev_run``
at the end only) it scores the probe set (per token: entropy in bits and the gradient strength of the chosen token's
raw logit, see :mod:`corrpo.inversion`), feeds the pairs to an :class:`InversionStrength` metric on the module's
device, and records Spearman rho, Pearson r, strength (= -rho) and the token count:

- logged as ``inversion/spearman|pearson|strength|n_tokens`` and ``phase`` against ``trainer/global_step``;
- appended to ``<run_dir>/emergence.csv`` (one tidy row per measurement);
- with a WandbLogger: the emergence curve as a figure marking the phase boundary, and a per-token table
  (token, entropy, strength, position) at the boundary and at the end.

With ``anatomy: true`` it also scores every probe token's anatomy factors (:mod:`corrpo.inversion.anatomy`:
1/rms, |gamma w_y|, sin, path gain, each rank-1 projection's |grad| and |act|) and records Spearman(H, factor):
logged as ``inversion/anatomy/<factor>``, added to emergence.csv as ``anatomy_<factor>`` columns, and written
per token to ``anatomy_tokens_<event>.csv`` at the boundary and the end; ``corrpo validate`` prints the table.

``source="reference"`` teacher-forces the probe traces (the same tokens every time: a clean curve);
``source="generated"`` scores the current policy's own greedy completions of the probe prompts (what the
paper measures on reasoning samples). Under ``corrpo validate`` it measures once and prints the result:
that is the fingerprint of any checkpoint.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.loggers import side_effect, wandb_loggers
from corrpo.inversion.anatomy_probe import AnatomyProbe, anatomy_columns, anatomy_factors, factor_table
from corrpo.inversion.metric import InversionStrength
from corrpo.inversion.strength import score_tokens
from corrpo.inversion.strength_config import StrengthConfig, strength_spec
from corrpo.models.batching import encode_sft_batch
from corrpo.models.sharding import gathered_copy, is_sharded
from corrpo.runs.progress import eval_progress
from corrpo.runs.run_folder import run_folder
from corrpo.training.host import require_even_split, require_held_out_data, require_host

TABLE_ROWS = 2000


class InversionTracker(L.Callback):
    """Probe-set inversion measurements across training (and once under ``validate``).

    Args:
        every_n_steps: measure after every this many train batches (plus start, boundary, end).
        source: ``reference`` (teacher-forced probe traces) or ``generated`` (the policy's greedy completions).
        strength: the gradient-strength spec (:class:`corrpo.inversion.strength_config.StrengthConfig`, YAML
            ``strength: {measure: nuclear, layers: last, ...}``); the paper's Q, K, V, O set by default.
        batch_size: probe sequences scored per call.
        max_tokens: cap of the metric's token buffer (memory = 16 bytes x max_tokens on the device).
        log_tables: log per-token wandb tables at the boundary and at the end.
        anatomy: also record Spearman(H, factor) of each exact factor of the last layer's strength (the final
            norm's 1/rms, |gamma w_y|, sin; the O path gain; each rank-1 projection's |grad|, |act|): one more
            forward + backward per probe batch; off costs nothing.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        source: Literal["reference", "generated"] = "reference",
        strength: StrengthConfig = StrengthConfig(),
        batch_size: int = 8,
        max_tokens: int = 65536,
        log_tables: bool = True,
        anatomy: bool = False,
    ) -> None:
        if source not in ("reference", "generated"):
            raise ValueError(f"InversionTracker.source must be 'reference' or 'generated', got {source!r}")
        if every_n_steps < 1:
            raise ValueError("InversionTracker.every_n_steps must be >= 1")
        self.every_n_steps = every_n_steps
        self.source = source
        self.strength = strength_spec(strength, "InversionTracker.strength")
        self.batch_size = batch_size
        self.log_tables = log_tables
        self.metric = InversionStrength(max_tokens=max_tokens)
        self.anatomy = AnatomyProbe(max_tokens) if anatomy else None
        self.rows: list[dict] = []

    @property
    def state_key(self) -> str:
        return f"InversionTracker[source={self.source},every={self.every_n_steps}]"

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_host(pl_module, "InversionTracker")
        require_held_out_data(trainer.datamodule, "InversionTracker")  # the probe set

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.rows and not trainer.fast_dev_run:  # a fast_dev_run measures once, at the end
            self.measure(trainer, pl_module, event="start", batches=0)
        done = pl_module.steps_done
        event = self._event_after(trainer, pl_module, done) if self.rows else None
        if event is not None and all(row["batches"] != done for row in self.rows):
            # a run extended to more steps (--extend) resumes at its old end, which it measured as "end" after its
            # final checkpoint: the measurement an uninterrupted run makes here is taken now
            self.measure(trainer, pl_module, event=event, batches=done)

    def _event_after(self, trainer: L.Trainer, pl_module: L.LightningModule, done: int) -> str | None:
        """``boundary`` / ``periodic`` when the run measures after ``done`` steps; None (the end is measured in
        on_train_end, after the last update; a fast_dev_run at the end only)."""
        if done == 0 or done >= pl_module.schedule.total or trainer.fast_dev_run:
            return None
        if pl_module.schedule.is_boundary(done):
            return "boundary"
        return "periodic" if done % self.every_n_steps == 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = batch["step"] + 1
        if (event := self._event_after(trainer, pl_module, done)) is not None:
            self.measure(trainer, pl_module, event=event, batches=done)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # steps_done, not total_steps: a run stopped early (max_steps, max_time) ends where it stopped
        self.measure(trainer, pl_module, event="end", batches=pl_module.steps_done)
        self._log_curve_figure(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            row = self.measure(trainer, pl_module, event="validate", batches=0)
            if trainer.is_global_zero:  # the fingerprint, kept next to the run's config.yaml
                run_folder(trainer).write_fingerprint(row)
            print(
                f"inversion/spearman={row['spearman']:.4f} inversion/pearson={row['pearson']:.4f} "
                f"n_tokens={row['n_tokens']}"
            )
            if self.anatomy is not None:
                print(factor_table(anatomy_factors(row), row["spearman"]))

    # -------------------------------------------------------------------------------------- measuring
    def _probe_batches(self, trainer, pl_module):
        # Under DDP each rank scores its own slice; the metric gathers every rank's tokens before computing.
        records = trainer.datamodule.probe_records()[trainer.global_rank :: trainer.world_size]
        for i in range(0, len(records), self.batch_size):
            chunk = records[i : i + self.batch_size]
            prompts = [r["prompt"] for r in chunk]
            if self.source == "generated":
                # the very tokens the policy sampled: a completion cut at max_new_tokens gets no eos, and no
                # decode/re-encode round trip can change the tokenisation
                rollout = pl_module.generate_rollout(prompts, 1, greedy=True)
                yield {
                    "input_ids": rollout.sequences,
                    "attention_mask": rollout.attention_mask,
                    "loss_mask": rollout.token_mask,
                }
                continue
            completions = [r["completion"] for r in chunk]
            enc = encode_sft_batch(pl_module.tokenizer, prompts, completions, 10**9, pl_module.prompt_format)
            yield {k: v.to(pl_module.device) for k, v in enc.items()}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, event: str, batches: int) -> dict:
        """Score the probe set once; log, append to emergence.csv and return the row."""
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()
        if self.anatomy is not None:
            self.anatomy.reset()
        token_rows, tables = [], event in ("boundary", "end", "validate")
        probe = trainer.datamodule.probe_records()
        n_probe = len(probe[trainer.global_rank :: trainer.world_size])
        if is_sharded(pl_module.policy):
            why = "under FSDP2: every rank must score the same number of batches"
            require_even_split("data.n_probe", len(probe), trainer.world_size, why)
        # FSDP2: the probes read whole weights, so they score a gathered copy (every method exact)
        with (
            eval_progress(trainer, f"inversion probe ({event})", n_probe) as advance,
            gathered_copy(pl_module.policy) as scored,
        ):
            for enc in self._probe_batches(trainer, pl_module):
                entropy, strength = score_tokens(
                    scored, enc["input_ids"], enc["attention_mask"], enc["loss_mask"], self.strength
                )
                advance(enc["input_ids"].shape[0])
                self.metric.update(entropy, strength, enc["loss_mask"])
                factors = {} if self.anatomy is None else self.anatomy.update(scored, enc, entropy)
                if (self.log_tables or factors) and tables and len(token_rows) < TABLE_ROWS:
                    token_rows.extend(self._token_rows(pl_module, enc, entropy, strength, factors))
        result = {k: v.item() for k, v in self.metric.compute().items()}
        if result["n_tokens"] == 0:  # a correlation of nothing is NaN: never log or save that as a fingerprint
            raise ValueError(
                "InversionTracker: the probe set scored 0 tokens (empty completions, or a tokenizer that maps "
                "everything to one token?); check model.policy's tokenizer and data.probe_source / data.n_probe"
            )
        if result.get("n_dropped", 0) > 0:
            warnings.warn(
                f"InversionTracker: {int(result['n_dropped'])} probe tokens did not fit the metric buffer and were "
                f"left out; raise trainer.callbacks InversionTracker.max_tokens (now {self.metric.max_tokens})",
                stacklevel=2,
            )
        phase = "init" if batches == 0 and event != "validate" else pl_module.schedule.phase_at(max(batches - 1, 0))
        row = {
            "step": trainer.global_step,
            "batches": batches,
            "phase": phase if event != "validate" else "validate",
            "event": event,
            "source": self.source,
            "spearman": result["spearman"],
            "pearson": result["pearson"],
            "strength": result["strength"],
            "n_tokens": int(result["n_tokens"]),
        }
        if self.anatomy is not None:
            row.update(anatomy_columns(self.anatomy.compute()))
        self.rows.append(row)
        self._log_row(trainer, row)
        self._log_curve_chart(trainer, pl_module)
        if token_rows:
            columns = ["token", "entropy_bits", "strength", "position", *factors]
            if self.log_tables:
                self._log_table(trainer, f"inversion/tokens_{event}", columns, token_rows[:TABLE_ROWS])
            if self.anatomy is not None and trainer.is_global_zero:
                run_folder(trainer).write_anatomy_tokens(event, columns, token_rows[:TABLE_ROWS])
        return row

    def _token_rows(self, pl_module, enc, entropy, strength, factors: dict) -> list[list]:
        rows = []
        ids, mask = enc["input_ids"].cpu(), enc["loss_mask"].cpu()
        cols = [c.detach().float().cpu() for c in (entropy, strength, *factors.values())]
        for b in range(ids.shape[0]):
            for j in torch.nonzero(mask[b]).flatten().tolist():
                token = pl_module.tokenizer.decode([int(ids[b, j])])
                rows.append([token, float(cols[0][b, j]), float(cols[1][b, j]), j, *(float(c[b, j]) for c in cols[2:])])
        return rows

    # ---------------------------------------------------------------------------------------- output
    def _log_row(self, trainer: L.Trainer, row: dict) -> None:
        metrics = {f"inversion/{k}": float(row[k]) for k in ("spearman", "pearson", "strength", "n_tokens")}
        # a factor constant on the probe set (NaN rho, e.g. a logit slope of 1) is not logged; the csv keeps its NaN
        rho = anatomy_factors(row)
        metrics.update({f"inversion/anatomy/{k}": v for k, v in rho.items() if math.isfinite(v)})
        metrics["phase"] = {"init": 0.0, "sft": 0.0, "rl": 1.0}.get(row["phase"], -1.0)
        metrics["batches"] = float(row["batches"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"[corrpo] inversion @ step {row['step']} ({row['event']}, {row['phase']}): "
            f"spearman={row['spearman']:.4f} pearson={row['pearson']:.4f} n_tokens={row['n_tokens']}"
        )
        if trainer.is_global_zero and trainer.state.fn != "validate":
            # Rewritten whole from the rows (restored from the checkpoint on resume), so that a resumed run's
            # file holds no row measured after the checkpoint it resumed from.
            run_folder(trainer).write_emergence(r for r in self.rows if r["event"] != "validate")

    def _log_table(self, trainer: L.Trainer, key: str, columns: list[str], rows: list[list]) -> None:
        for logger in wandb_loggers(trainer):
            with side_effect(f"the {key} table"):  # a failed drawing warns, the run goes on
                logger.log_table(key=key, columns=columns, data=rows)

    def _log_curve_chart(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The emergence curve so far as a wandb line chart (Spearman rho against train batches), redrawn at every
        probe, with the SFT -> RL boundary as a vertical line."""
        loggers = wandb_loggers(trainer)
        rows = [r for r in self.rows if r["event"] != "validate" and math.isfinite(r["spearman"])]
        if not loggers or not rows:
            return
        import wandb

        xs, ys = [[r["batches"] for r in rows]], [[r["spearman"] for r in rows]]
        keys = ["Spearman rho (probe set)"]
        boundary = pl_module.schedule.boundary_step
        if boundary is not None:
            xs.append([boundary, boundary])
            ys.append([min(min(ys[0]), -1.0), max(max(ys[0]), 0.0)])
            keys.append("SFT -> RL boundary")
        chart = wandb.plot.line_series(
            xs=xs, ys=ys, keys=keys, title="Inversion emergence (Spearman rho; lower = stronger)", xname="batches"
        )
        for logger in loggers:
            with side_effect("the inversion/emergence_curve chart"):
                logger.experiment.log({"inversion/emergence_curve": chart, "trainer/global_step": trainer.global_step})

    def _log_curve_figure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = wandb_loggers(trainer)
        if not loggers or len(self.rows) < 2:
            return
        from corrpo.runs.plotting import emergence_figure

        figure = emergence_figure(self.rows, boundary_batches=pl_module.schedule.boundary_step)
        for logger in loggers:
            with side_effect("the inversion/emergence figure"):
                logger.log_image(key="inversion/emergence", images=[figure])

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"rows": list(self.rows), "strength_config": asdict(self.strength)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))
