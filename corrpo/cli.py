"""``corrpo fit|validate|test --config configs/X.yaml``: LightningCLI over CorrPOModule + ReasoningDataModule.

Beyond stock LightningCLI:
- ``parser_mode="omegaconf"`` so recipes may interpolate (``${model.rl.steps}``);
- the phase lengths are linked from the model to the data (``model.sft.steps -> data.sft_steps``), so they
  are set once;
- every run gets its own folder ``<trainer.default_root_dir>/<YYYYmmdd-HHMMSS>``, and a logger whose
  ``save_dir`` is unset writes there too: the resolved config, the wandb offline run, emergence.csv,
  results.json, checkpoints (``<run>/checkpoints``) and the exported policy sit side by side, whatever the loggers
  (a CSV or TensorBoard logger keeps only its own files in its ``<name>/version_<n>/``);
- ``seed_everything`` (default 0) also seeds the model, the data order and the embedded task where
  ``model.seed``, ``data.seed``, ``data.arithmetic.seed`` are unset (:func:`fill_unset_seeds`);
- ``--ckpt_path last`` resumes the newest run under ``default_root_dir`` whose saved config.yaml matches the
  command's (:mod:`corrpo.runs.resume`): its newest checkpoint that loads, its folder and its wandb run id (so
  the curves continue in the same wandb run); checkpoints of other configs are refused with the differing
  keys, a corrupt one is skipped with its reason; with no checkpoint there it starts fresh, as Lightning
  does. ``--ckpt_path <run folder>`` names the run explicitly. A resumed run's config.yaml is never rewritten;
- a run stopped by SIGTERM / SIGINT saves a checkpoint at the step boundary and exits 143 / 130
  (:class:`callbacks.checkpoint.ResumableCheckpoint`); ``fit`` with both phases at 0 steps is an error;
- wandb runs offline unless the user configured it online (``WANDB_MODE`` or ``WANDB_API_KEY`` set).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from corrpo.data.datamodule import ReasoningDataModule
from corrpo.data.records import RecordError
from corrpo.models.batching import PromptRenderError, check_prompts_render
from corrpo.models.finite import non_finite_message, nonfinite_fields
from corrpo.module import CorrPOModule
from corrpo.rewards.dry_run import RewardDryRunError
from corrpo.rewards.spec import RewardConfigError
from corrpo.runs.atomic import write_text_atomic
from corrpo.runs.continuation import add_continuation_arguments, allowed_keys, continue_on_purpose
from corrpo.runs.lock import RunLockedError, hold_run_lock
from corrpo.runs.own_folder import detach_from_other_runs, evaluate_every_batch, runs_root
from corrpo.runs.resume import ResumeError, checkpoint_problem, is_distributed_checkpoint, resume_point
from corrpo.runs.run_folder import CONFIG_FILE, RunFolder, run_dir
from corrpo.runs.wandb_segments import newest_run_id

__all__ = ["CorrPOCLI", "ResumeError", "build_cli", "main", "new_run_folder", "resume_point"]

RUN_DIR_ENV = "CORRPO_RUN_DIR"


SUBCOMMANDS: dict[str, str] = {
    "fit": "Train: SFT, then GRPO / CorR-PO RL, into a new run folder (config, curves, results, policy).",
    "validate": "Fingerprint a checkpoint: measure the entropy/logit-gradient inversion once on the probe set "
    "(--ckpt_path; writes fingerprint.json).",
    "test": "Greedy test accuracy of a checkpoint (--ckpt_path) on the data module's test split.",
    "report": "Summarise run folders offline: summary.md and figures (emergence, reward, accuracy, completion "
    "length) (corrpo report <run|parent|latest>).",
}
"""Every subcommand of ``corrpo`` with its one-line help (``report`` is dispatched before LightningCLI)."""

REFUSED_OPTIONS: dict[str, str] = {
    "--optimizer": "each phase has its own AdamW: set model.sft.lr / model.rl.lr and .weight_decay",
    "--lr_scheduler": "each phase has its own warm-up + cosine: set model.sft/rl.warmup_steps and .min_lr_ratio",
    "--trainer.gradient_clip_val": "training is manual optimisation: set model.sft.max_grad_norm / "
    "model.rl.max_grad_norm",
    "--trainer.gradient_clip_algorithm": "clipping is by norm, per phase: model.sft/rl.max_grad_norm",
    "--trainer.accumulate_grad_batches": "training is manual optimisation: set model.sft.micro_batch_size and "
    "model.rl.micro_batch_size (gradient accumulation over micro-batches inside each update, the same update as the "
    "whole batch), and model.rl.generation_batch_size / model.eval_batch_size for the generate calls",
}
"""Lightning options that manual optimisation with one optimizer per phase cannot honour, and what to set instead."""


def configure_parsing() -> None:
    """Attribute docstrings become ``--help`` text (as litgpt's CLI does): every config dataclass field documents
    itself, so ``corrpo fit --help`` explains every key."""
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)


class _DropNotices(logging.Filter):
    """Drop Lightning's product tips (litlogger, litmodels), the notice that a model summary is configured (the CLI
    configures it) and the summary's "Total FLOPs: 0" line (FLOPs are only counted with an example input, so it
    is 0 on every run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(("💡 Tip:", "Trainer already configured with model summary callbacks")):
            return False
        if "Total FLOPs" in message:
            record.msg = "\n".join(line for line in message.splitlines() if "Total FLOPs" not in line)
            record.args = None
        return True


def quiet_lightning_notices() -> None:
    """Install :class:`_DropNotices` on the two Lightning loggers that print them (once per process)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.callbacks.model_summary"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())


def tag_wandb_runs(config) -> None:
    """Group each wandb run by method (grpo / corrpo / top_entropy, from ``model.rl``) and tag it with the method
    and the seed, unless the config sets them: a sweep's runs then group and filter by method and seed."""
    from corrpo.runs.run_folder import method_name

    method = method_name(config.model.rl)
    seed = config.get("seed_everything")
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        if init_args is None or not str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
            continue
        if not init_args.get("group"):
            init_args.group = method
        if not init_args.get("tags"):
            init_args.tags = [method, f"seed-{seed}"]


def refuse_unsupported(args: list[str], trainer_config=None) -> None:
    """Fail before anything is built when a command line (or the trainer section of a config) asks for an option in
    :data:`REFUSED_OPTIONS`, saying what to set instead."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name in REFUSED_OPTIONS:
            raise SystemExit(f"corrpo: {name} is not supported: {REFUSED_OPTIONS[name]}")
    if trainer_config is not None:
        for key in ("gradient_clip_val", "gradient_clip_algorithm"):
            if trainer_config.get(key) is not None:
                raise SystemExit(f"corrpo: trainer.{key} is not supported: {REFUSED_OPTIONS['--trainer.' + key]}")
        check_no_automatic_accumulation(trainer_config.get("accumulate_grad_batches"))


class CorrPOCLI(LightningCLI):
    """LightningCLI with linked phase lengths and one folder per run."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate (the fingerprint) and test; ``predict`` has nothing to predict here."""
        skipped = LightningCLI.subcommands()
        return {name: skipped[name] for name in ("fit", "validate", "test")}

    def _add_subcommands(self, parser, **kwargs) -> None:
        """Lightning's, with corrpo's one-line help per subcommand (not the Trainer method's docstring), and
        ``report`` listed too."""
        from jsonargparse import ArgumentParser

        self._subcommand_parsers = {}
        parser_subcommands = parser.add_subcommands()
        for subcommand in self.subcommands():
            subparser_kwargs = {**kwargs.get(subcommand, {}), "description": SUBCOMMANDS[subcommand]}
            subcommand_parser = self._prepare_subcommand_parser(self.trainer_class, subcommand, **subparser_kwargs)
            self._subcommand_parsers[subcommand] = subcommand_parser
            parser_subcommands.add_subcommand(subcommand, subcommand_parser, help=SUBCOMMANDS[subcommand])
        report = ArgumentParser(description=SUBCOMMANDS["report"])  # for the listing: main() runs report itself
        parser_subcommands.add_subcommand("report", report, help=SUBCOMMANDS["report"])

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """Lightning's, with :class:`corrpo.runs.progress.PhaseProgressBar` (a bar per phase) as the progress bar unless
        the config disables the bar or brings its own."""
        from lightning.pytorch.callbacks import ModelSummary, ProgressBar

        from corrpo.runs.progress import PhaseProgressBar

        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, PhaseProgressBar()]
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in configured):
            # the plain summary (logged, so _DropNotices can take its "Total FLOPs: 0" line out), not the rich one
            callbacks = [*callbacks, ModelSummary()]
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.sft.steps", "data.sft_steps")
        parser.link_arguments("model.rl.steps", "data.rl_steps")
        add_continuation_arguments(parser)  # --extend, --resume_may_differ; config.yaml's records

    def _parse_ckpt_path(self) -> None:
        """Nothing: Lightning's loads the checkpoint's hyper-parameters over the command's ``model.*`` (config.yaml
        said 4 SFT steps, the run trained 8; a crafted checkpoint chose a module to import). corrpo compares them
        with the command instead and refuses a difference naming the keys (:func:`continue_on_purpose`)."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        fill_unset_seeds(config)  # before the resume check: a saved config.yaml holds the seeds its run used
        if bad := nonfinite_fields(config.as_dict()):  # YAML's .inf / .nan, 1e400: refused as on the command line
            self.parser.error(non_finite_message(bad))
        if self.subcommand == "fit":
            _check_something_to_train(config)
        refuse_unsupported([], config.trainer)
        tag_wandb_runs(config)
        trainer = config.trainer
        root = Path(trainer.default_root_dir or "runs")
        root = root if os.environ.get("CORRPO_KEEP_RUN_DIR") else runs_root(root)  # a run folder given: its parent
        resume = None
        ckpt_path = config.get("ckpt_path")
        names_run = ckpt_path and Path(ckpt_path).is_dir() and not is_distributed_checkpoint(Path(ckpt_path))
        # compared before the CLI fills in this run's folders, as the saved config was before it ran
        command = yaml.safe_load(self._parser(self.subcommand).dump(config, skip_none=False))
        if ckpt_path == "last" or names_run:
            runs = None if ckpt_path == "last" else [Path(ckpt_path)]
            allowed = allowed_keys(config, command, self.subcommand)  # --extend, --resume_may_differ (checked)
            resume = resume_point(root, command, runs, allowed)
            if resume is None:
                where = f"{root}/*/" if runs is None else ckpt_path
                warnings.warn(f"--ckpt_path {ckpt_path}: no checkpoint in {where}; starting a fresh run", stacklevel=2)
            config.ckpt_path = str(resume[1]) if resume else None
        elif ckpt_path:
            problem = checkpoint_problem(ckpt_path)
            if problem is not None:
                raise ResumeError(f"--ckpt_path {ckpt_path} {problem}")
        written = continue_on_purpose(config, command, self.subcommand, resume)  # a checkpoint never sets the config
        resume = resume if self.subcommand == "fit" else None  # validate / test read it, in a folder of their own
        # a resumed run keeps the config.yaml it was started with (equal up to where/how-long keys), unless changed
        self.save_config_kwargs["keep_existing"] = resume is not None and written is None
        self.save_config_kwargs["written_values"] = written
        if resume is not None:
            root = resume[0]
        elif os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(RUN_DIR_ENV):
            root = Path(os.environ[RUN_DIR_ENV])  # a DDP child process: the folder rank 0 chose
        elif not os.environ.get("CORRPO_KEEP_RUN_DIR"):
            root = new_run_folder(root)
            self._new_folder = root
        trainer.default_root_dir = str(root)
        detach_from_other_runs(trainer, root)  # a run's config.yaml names its folders: this command writes its own
        evaluate_every_batch(trainer, self.subcommand)  # validate / test: limit_val/test_batches=0 measured nothing
        self._lock = hold_run_lock(root)  # before anything touches the folder: a second process is refused here
        os.environ[RUN_DIR_ENV] = str(root)  # inherited by the processes Lightning's DDP launcher starts
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        wandb_id = newest_run_id(root) if resume is not None else None
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args and init_args.save_dir in (None, ".", ""):
                init_args.save_dir = str(root)
            if wandb_id and init_args is not None and "id" in init_args and not init_args.get("id"):
                init_args.id = wandb_id
        for callback in trainer.callbacks or []:
            init_args = getattr(callback, "init_args", None)
            if str(callback.class_path).endswith("Checkpoint") and init_args is not None:
                if not init_args.get("dirpath"):
                    init_args.dirpath = str(RunFolder(root).checkpoints)

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, but a run stopped by a signal (``SystemExit(143)``, Ctrl+C) says how far it got and still
        closes its wandb run."""
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            if subcommand == "fit":
                self._say_where_it_stopped()
            self._finish_wandb()
            raise
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def _say_where_it_stopped(self) -> None:
        """Warn ``the run stopped after N of M SFT steps; RL never ran`` (or how many RL steps ran) for a run stopped
        before its last step (a finished run, or one stopped by ``max_steps``, says so in ``on_train_end``)."""
        module = self.model
        if isinstance(module, CorrPOModule) and self.trainer.is_global_zero:
            note = module.schedule.stop_note(module.steps_done)
            if note is not None:
                warnings.warn(f"{note} (interrupted)", stacklevel=2)

    def instantiate_classes(self) -> None:
        """Lightning's, but a run that cannot even be built (a wrong ``model.policy`` path, a bad data file)
        takes back the run folder it was given while that is still empty: no litter of empty timestamps. The data
        are read (and a few rendered with the chat template) here, before the Trainer starts a logger: a misnamed field
        or a broken template stops the run with no folder left."""
        try:
            super().instantiate_classes()
            if isinstance(self.datamodule, ReasoningDataModule):
                pools = self.datamodule.pools()
                if isinstance(self.model, CorrPOModule):  # a broken chat template: now, not at the first evaluation
                    check_prompts_render(self.model.tokenizer, self.model.prompt_format, pools)
        except BaseException:
            self._release_lock()
            folder = getattr(self, "_new_folder", None)
            if folder is not None and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            raise

    def _finish_wandb(self) -> None:
        """Close wandb runs so that a second run in the same process gets its own (tests, notebooks)."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()

    def after_fit(self) -> None:
        self._finish_wandb()

    def after_validate(self) -> None:
        self._finish_wandb()

    def after_test(self) -> None:
        self._finish_wandb()


def check_no_automatic_accumulation(accumulate_grad_batches: int | None) -> None:
    """corrpo optimises manually (an RL batch is several forwards and updates), so Lightning cannot accumulate
    gradients over batches; the micro-batch keys do it inside each update, normalised as the whole batch."""
    if accumulate_grad_batches not in (None, 1):
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} is not supported: "
            f"{REFUSED_OPTIONS['--trainer.accumulate_grad_batches']}"
        )


class RunConfigSaver(SaveConfigCallback):
    """Lightning's SaveConfigCallback, except that config.yaml goes to the run folder whatever the loggers, and a
    resumed run (``keep_existing``) keeps its config.yaml; one continued with changes gets the command's config with
    ``written_values`` (the run's own ``ckpt_path``, not this resume's options: :func:`continue_on_purpose`).

    The CLI has already checked that the saved config matches the command's; rewriting it would replace the
    run's own record with the resuming command's (another ``max_steps``), and before that check existed it
    replaced another run's config outright.
    """

    def __init__(self, *args, keep_existing: bool = False, written_values: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_existing, self.written_values = keep_existing, dict(written_values or {})

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Lightning's, but into the run folder (:func:`corrpo.runs.run_folder.run_dir`, whatever the loggers), not
        ``trainer.log_dir`` (a CSV or TensorBoard logger's ``<name>/version_<n>/``)."""
        if self.already_saved:
            return
        path = run_dir(trainer) / self.config_filename  # the same folder on every rank, no broadcast
        if self.keep_existing and path.is_file():
            self.already_saved = True
            return
        if trainer.is_global_zero:
            if self.save_to_log_dir:  # atomic: a crash never leaves a half-written config.yaml
                written = self.config.clone()
                for key, value in self.written_values.items():
                    written[key] = value
                write_text_atomic(path, self.parser.dump(written, skip_none=False))
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True


SEED_KEYS = ("model.seed", "data.seed", "data.arithmetic.seed")
"""The seeds of their own that take ``seed_everything``'s value when unset: the tiny model's initial weights (and
LoRA's init), the batch order and held-out splits, the embedded task's problems."""


def fill_unset_seeds(config) -> None:
    """Set each unset seed of :data:`SEED_KEYS` to ``seed_everything``'s value (Lightning's drawn one for ``true``; 0
    for ``false``), in the config itself: config.yaml then records the seeds the run used, and a resume compares
    them. So ``--seed_everything 1`` alone changes the weights, the data order and the problems, not only sampling."""
    seed = config.get("seed_everything")
    default = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    for key in SEED_KEYS:
        if key in config and config[key] is None:
            config[key] = default


def _check_something_to_train(config) -> None:
    """``corrpo fit`` with both phases at 0 steps used to "train" nothing and exit 0 (e.g. no --config)."""
    model = config.get("model")
    sft, rl = (model.get("sft"), model.get("rl")) if model is not None else (None, None)
    sft_steps = sft.get("steps", 0) if sft is not None else 0
    rl_steps = rl.get("steps", 0) if rl is not None else 0
    if not sft_steps and not rl_steps:
        raise ValueError(
            "corrpo fit: both phases have 0 steps (model.sft.steps=0, model.rl.steps=0), so nothing would be "
            "trained; pass a recipe (--config configs/tiny.yaml) or set model.sft.steps / model.rl.steps"
        )


def new_run_folder(root: Path) -> Path:
    """Create and return ``root/<YYYYmmdd-HHMMSS>``, or ``...-1``, ``-2``, ... when runs start in the same second
    (a sweep launching seeds at once): each run owns its folder, created atomically so none can share one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        folder = root / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"trainer.default_root_dir={root}: 10,000 run folders named {stamp}-*; clean it up")


def _default_wandb_offline() -> None:
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


def build_cli(args: list[str] | None = None, run: bool = True) -> CorrPOCLI:
    """Parse ``args`` (default ``sys.argv``) and, with ``run``, execute the subcommand."""
    import sys

    _default_wandb_offline()
    configure_parsing()
    quiet_lightning_notices()
    refuse_unsupported(list(sys.argv[1:] if args is None else args))
    return CorrPOCLI(
        CorrPOModule,
        ReasoningDataModule,
        parser_kwargs={"parser_mode": "omegaconf", "description": "corrpo: SFT then GRPO / CorR-PO on a causal LM."},
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True, "config_filename": CONFIG_FILE},
        seed_everything_default=0,  # not Lightning's random seed: unset, a run is seeded (weights, data, sampling) 0
        auto_configure_optimizers=False,  # no --optimizer / --lr_scheduler: each phase owns its AdamW + schedule
        args=args,
        run=run,
    )


USER_ERRORS = (RecordError, RewardDryRunError, RewardConfigError, RunLockedError, ResumeError, PromptRenderError)
"""Errors whose message is the whole story: a data row (file, line, field, columns), a reward broken before training
(its name, what it did) or an ``rl.rewards`` entry that cannot be built (its key), another live process on the run
folder (its pid), no run to resume or a checkpoint with other settings (the keys), a chat template that cannot
render the data (the pool and record)."""


def main() -> None:
    """Console entry point (``corrpo``): ``corrpo report <run_dir>``, else the LightningCLI subcommands."""
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from corrpo.runs.report import report_main

        report_main(sys.argv[2:])
        return
    try:
        build_cli()
    except USER_ERRORS as err:  # one line that names what to fix, no traceback
        raise SystemExit(f"corrpo: {err}") from None


if __name__ == "__main__":
    main()
