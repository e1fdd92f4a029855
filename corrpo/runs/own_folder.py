"""Every command writes into a folder of its own: never into another run's.

A run's config.yaml names its own folder (``trainer.default_root_dir``, the logger's ``save_dir``, the checkpoint
``dirpath``), so a command given ``--config <run>/config.yaml`` without resuming that run, and ``corrpo validate``
/ ``test`` always, used to write into it: a second wandb run (after which ``corrpo report`` lost the reward
curve), its config.yaml overwritten, new checkpoints beside the run's. Here:

- :func:`runs_root`: a run folder given as ``trainer.default_root_dir`` stands for the folder that holds it, so a
  new run or an evaluation gets a folder beside it and ``--ckpt_path last`` finds it among its siblings;
- :func:`detach_from_other_runs`: logger and checkpoint paths inside another run's folder are cleared (and a
  logger's run ``id`` / ``version`` with them), so the CLI points them at the command's own folder;
- :func:`evaluate_every_batch`: ``limit_val_batches: 0`` (recipes set it: training evaluates itself) would make
  ``corrpo validate`` measure and print nothing; under validate / test the limit of that loop is lifted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from corrpo.runs.run_folder import CONFIG_FILE


def run_folder_of(path: str | Path | None) -> Path | None:
    """The run folder ``path`` is (or lies in): the nearest folder up from it holding a config.yaml; else None."""
    if path in (None, "", "."):
        return None
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def runs_root(root: Path) -> Path:
    """``root``, or the folder holding it when ``root`` is itself a run folder (it holds a config.yaml)."""
    if (root / CONFIG_FILE).is_file():
        warnings.warn(
            f"trainer.default_root_dir={root} is a run folder (a run's config.yaml); this command's folder goes "
            f"beside it, under {root.parent}",
            stacklevel=3,
        )
        return root.parent
    return root


def detach_from_other_runs(trainer, own: Path) -> list[str]:
    """Clear every logger ``save_dir`` and checkpoint ``dirpath`` of the trainer config that lies in a run folder
    other than ``own``, and that logger's ``id`` / ``version`` (another run's wandb id would continue its curves);
    returns the keys cleared. The CLI then fills them in with ``own``."""
    own = Path(own).absolute()
    cleared = []
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for i, logger in enumerate(loggers):
        init_args = getattr(logger, "init_args", None)
        if init_args is None or "save_dir" not in init_args:
            continue
        other = run_folder_of(init_args.save_dir)
        if other is not None and other != own:
            cleared.append(f"trainer.logger[{i}].init_args.save_dir={init_args.save_dir}")
            init_args.save_dir = None
            for key in ("id", "version"):
                if key in init_args and init_args.get(key) is not None:
                    init_args[key] = None
    for i, callback in enumerate(trainer.callbacks or []):
        init_args = getattr(callback, "init_args", None)
        if init_args is None or not init_args.get("dirpath"):
            continue
        other = run_folder_of(init_args.dirpath)
        if other is not None and other != own:
            cleared.append(f"trainer.callbacks[{i}].init_args.dirpath={init_args.dirpath}")
            init_args.dirpath = None
    return cleared


def evaluate_every_batch(trainer, subcommand: str) -> None:
    """Under ``validate`` / ``test``: a ``limit_val_batches`` / ``limit_test_batches`` of 0 becomes None (all
    batches), so the command measures and prints its result."""
    key = {"validate": "limit_val_batches", "test": "limit_test_batches"}.get(subcommand)
    if key is not None and key in trainer and trainer.get(key) == 0:
        trainer[key] = None
