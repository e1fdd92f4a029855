"""``corrpo fit|validate|test --config configs/X.yaml``: LightningCLI over CorrPOModule + ReasoningDataModule.

Beyond stock LightningCLI:
- ``parser_mode="omegaconf"`` so recipes may interpolate (``${model.rl.steps}``);
- the phase lengths are linked from the model to the data (``model.sft.steps -> data.sft_steps``), so they
  are set once;
- every run gets its own folder ``<trainer.default_root_dir>/<YYYYmmdd-HHMMSS>``, and a logger whose
  ``save_dir`` is unset writes there too: the resolved config, the wandb offline run, emergence.csv,
  results.json and the exported policy sit side by side;
- wandb runs offline unless the user configured it online (``WANDB_MODE`` or ``WANDB_API_KEY`` set).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from corrpo.data.datamodule import ReasoningDataModule
from corrpo.module import CorrPOModule


class CorrPOCLI(LightningCLI):
    """LightningCLI with linked phase lengths and one folder per run."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.sft.steps", "data.sft_steps")
        parser.link_arguments("model.rl.steps", "data.rl_steps")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        root = Path(trainer.default_root_dir or "runs")
        if not os.environ.get("CORRPO_KEEP_RUN_DIR"):
            root = root / time.strftime("%Y%m%d-%H%M%S")
        trainer.default_root_dir = str(root)
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args and init_args.save_dir in (None, ".", ""):
                init_args.save_dir = str(root)

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


def _default_wandb_offline() -> None:
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"


def build_cli(args: list[str] | None = None, run: bool = True) -> CorrPOCLI:
    """Parse ``args`` (default ``sys.argv``) and, with ``run``, execute the subcommand."""
    _default_wandb_offline()
    return CorrPOCLI(
        CorrPOModule,
        ReasoningDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """Console entry point (``corrpo``)."""
    build_cli()


if __name__ == "__main__":
    main()
