"""Which checkpoint ``--ckpt_path last`` resumes: the newest one that loads, of a run made by the same config.

Two failures this guards against, both seen on real machines:

- **A corrupt newest checkpoint.** A kill during a non-atomic save, or a full disk, leaves a 0-byte or
  truncated ``.ckpt`` that is the newest by mtime; resuming it dies with a bare ``EOFError`` or
  "PytorchStreamReader failed reading zip archive" although an intact older checkpoint sits beside it. Each
  candidate is checked first (:func:`checkpoint_problem`: a torch zip archive whose every member's CRC
  matches, which reads the file once but unpickles nothing) and a bad one is skipped with a warning saying why.
- **Another run's checkpoint.** Runs share ``trainer.default_root_dir``; the newest checkpoint there may be
  a different experiment's. Resuming it trains the wrong thing, and used to overwrite that run's
  config.yaml and extend its wandb run. A run is only resumed when its saved ``config.yaml`` equals the
  command's config, up to :data:`RESUME_MAY_DIFFER` (keys that say where or how long, not what) and the keys the
  command lists as allowed to differ (``--extend``, ``--resume_may_differ``: :mod:`corrpo.runs.continuation`).

A run folder whose config.yaml cannot be read (a crash while it was written, a bad edit) is skipped with the
reason, never an error that blocks resuming another run.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
import yaml

from corrpo.runs.run_folder import CONFIG_FILE

# Keys a resuming command may set differently from the run it resumes: where the files go (filled in by the
# CLI from the run folder), how far to train this time, the progress bar, and the --config file names.
RESUME_MAY_DIFFER: tuple[str, ...] = (
    "ckpt_path",
    "config",
    "config[*]",
    "trainer.default_root_dir",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.enable_progress_bar",
    "trainer.logger*.init_args.save_dir",
    "trainer.logger*.init_args.id",
    "trainer.logger*.init_args.version",
    "trainer.callbacks[*].init_args.dirpath",
    # what the command asks of a resume, and what corrpo records in config.yaml: not what is trained
    "extend",
    "resume_may_differ*",
    "resumed_with_changes*",
    "code_version*",
)


LIGHTNING_HEADER = "# lightning.pytorch=="
"""The first line of every config.yaml the CLI writes."""


class ResumeError(ValueError):
    """``--ckpt_path`` names no run this command may resume; the message says why and what to run instead."""


DISTRIBUTED_FILES = (".metadata", "meta.pt")
"""What a distributed (FSDP2, ``ModelParallelStrategy``) checkpoint folder holds besides its ``*.distcp`` shards:
torch.distributed.checkpoint's index and Lightning's non-tensor state (written last, by rank 0)."""


def is_distributed_checkpoint(path: Path) -> bool:
    """True for a ``*.ckpt`` folder written by ``ModelParallelStrategy`` (one shard file per rank)."""
    return path.is_dir() and all((path / name).is_file() for name in DISTRIBUTED_FILES)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be a checkpoint to resume (empty, truncated, corrupt), or None when it is whole.

    A torch checkpoint is a zip archive: a truncated file has no central directory, a damaged one fails a
    member's CRC. Nothing is unpickled, so this is safe on any file and costs one read. A distributed checkpoint
    (a folder) needs its index, its shards (none empty) and a whole ``meta.pt``.
    """
    path = Path(path)
    if path.is_dir():
        missing = [name for name in DISTRIBUTED_FILES if not (path / name).is_file()]
        shards = list(path.glob("*.distcp"))
        if missing or not shards:
            what = ", ".join(missing + ([] if shards else ["*.distcp shards"]))
            return f"is a folder but not a whole distributed checkpoint (no {what})"
        empty = [p.name for p in shards if p.stat().st_size == 0]
        if empty:
            return f"is a distributed checkpoint with empty shards ({', '.join(empty)})"
        problem = checkpoint_problem(path / "meta.pt")
        return None if problem is None else f"is a distributed checkpoint whose meta.pt {problem}"
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(name.endswith("data.pkl") for name in names):
                return f"is a zip archive but not a torch checkpoint ({size} bytes, no data.pkl)"
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        return f"is truncated or corrupt ({size} bytes: {err})"
    if bad is not None:
        return f"is corrupt ({size} bytes: CRC mismatch in {bad})"
    return None


def checkpoint_record(path: str | os.PathLike) -> dict:
    """What corrpo reads of a checkpoint before it is loaded: ``hyper_parameters`` (the ``model`` config it was
    trained with) and ``steps_done``. Loaded with ``weights_only=True`` (no object is unpickled, so a crafted file
    runs nothing) and memory-mapped (the tensors are not read). A distributed checkpoint: its ``meta.pt``.
    Raises :class:`ResumeError` naming the file when it cannot be read so."""
    path = Path(path)
    target = path / "meta.pt" if path.is_dir() else path
    try:
        loaded = torch.load(target, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds; the message is what the user needs
        raise ResumeError(f"--ckpt_path {path}: cannot read its saved settings safely ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None  # fmt: skip
    if not isinstance(loaded, dict):
        raise ResumeError(f"--ckpt_path {path} holds a {type(loaded).__name__}, not a Lightning checkpoint")
    hparams = loaded.get("hyper_parameters") or {}
    state = loaded.get("corrpo") or {}
    return {
        "hyper_parameters": {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")},
        "steps_done": state.get("steps_done") if isinstance(state, dict) else None,
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``: every leaf of a config under its dotted key."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: value}


def key_allowed(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True when the dotted ``key`` (``model.rl.rewards[0].kwargs.x``) is one of ``patterns`` or lies below one
    (``model.rl.rewards`` allows every entry of the list), or matches one as a glob (``model.rl.*``; ``[*]`` = any
    list index)."""
    for pattern in patterns:
        if key == pattern or key.startswith((pattern + ".", pattern + "[")):
            return True
        if fnmatch.fnmatchcase(key, pattern.replace("[*]", "[[]*[]]")):
            return True
    return False


def _is_newer_key(key: str, saved: dict[str, Any]) -> bool:
    """A dotted key the saved (flattened) config lacks because corrpo added it since: a mapping key outside any list
    (a list entry is the user's content: a missing one is a difference), none of whose ancestors is a saved leaf
    (a value that became a mapping, e.g. a reward name turned into a factory, is a difference)."""
    if "[" in key:
        return False
    parts = key.split(".")
    return not any(".".join(parts[:i]) in saved for i in range(1, len(parts)))


def config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every leaf that differs, except :data:`RESUME_MAY_DIFFER`.

    A key the saved config does not hold at all comes from a newer corrpo than the run's: not a difference (the
    run cannot have set it), but warned with the value the resumed run takes, so a key whose default changes
    what is trained is seen."""
    a, b = flatten(saved or {}), flatten(current or {})
    out, newer = [], []
    for key in sorted(set(a) | set(b)):
        if key_allowed(key, RESUME_MAY_DIFFER):
            continue
        if key not in a and _is_newer_key(key, a):
            newer.append(f"{key}={b[key]!r}")
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append((key, a.get(key, "<unset>"), b.get(key, "<unset>")))
    if newer and saved:
        warnings.warn(
            "the run's config.yaml predates these keys; the resumed run takes their current values: "
            + ", ".join(newer[:12])
            + (f" and {len(newer) - 12} more" if len(newer) > 12 else ""),
            stacklevel=3,
        )
    return out


def read_saved_config(path: Path) -> dict:
    """A run's config.yaml as a mapping; :class:`ResumeError` naming the file (and line) when it cannot be read, is
    not YAML, or was cut short (a crash while it was written: one the CLI wrote starts with Lightning's header and
    ends with ``ckpt_path``, so one without it is incomplete, though what is left may parse)."""
    try:
        text = path.read_text(encoding="utf-8")
        saved = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark, position = getattr(err, "problem_mark", None), getattr(err, "position", None)
        line = mark.line + 1 if mark is not None else text.count("\n", 0, position) + 1 if position is not None else 0
        where = f"{path}:{line}" if line else str(path)
        raise ResumeError(f"{where} is not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResumeError(f"{path} cannot be read ({err})") from None
    if saved is None:
        saved = {}
    if not isinstance(saved, dict):
        raise ResumeError(f"{path} holds a {type(saved).__name__}, not a config mapping (a damaged file?)")
    if text.startswith(LIGHTNING_HEADER) and "ckpt_path" not in saved:
        raise ResumeError(f"{path} is cut short: it lacks ckpt_path, the key written last (a crash while saving it?)")
    return saved


def saved_config_path(run: Path) -> Path | None:
    """The run's config.yaml: in the run folder, else in its logger's folder (where a CSV or TensorBoard logger's
    run wrote it, ``<run>/<name>/version_<n>/``, before it always went to the run folder; the newest one then)."""
    if (run / CONFIG_FILE).is_file():
        return run / CONFIG_FILE
    nested = [p for p in run.glob(f"*/**/{CONFIG_FILE}") if p.is_file()]
    return max(nested, key=lambda p: p.stat().st_mtime) if nested else None


def _checkpoints_newest_first(run: Path) -> list[Path]:
    """A run folder's ``*.ckpt`` files and distributed checkpoint folders, newest first; at equal mtime
    ``last*.ckpt`` first."""
    ckpts = [p for p in run.rglob("*.ckpt") if p.is_file() or is_distributed_checkpoint(p)]
    return sorted(ckpts, key=lambda p: (_saved_at(p), p.name.startswith("last")), reverse=True)


def _saved_at(checkpoint: Path) -> float:
    """When a checkpoint was written: a file's mtime, a distributed checkpoint's ``meta.pt`` (its last file)."""
    return (checkpoint / "meta.pt" if checkpoint.is_dir() else checkpoint).stat().st_mtime


def describe_differences(
    differences: list[tuple[str, Any, Any]], pattern: str = "{key}: {old!r} in the run, {new!r} in this command"
) -> str:
    """The first 8 ``(key, old, new)`` differences, each by ``pattern``, and how many more."""
    shown = [pattern.format(key=key, old=old, new=new) for key, old, new in differences[:8]]
    return "; ".join(shown) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")


def resume_point(
    root: str | os.PathLike,
    config: dict | None = None,
    runs: list[Path] | None = None,
    may_differ: tuple[str, ...] | list[str] = (),
) -> tuple[Path, Path] | None:
    """``(run folder, checkpoint)`` to resume under ``root``, or None when there is no checkpoint at all.

    Run folders (``runs``, default every folder under ``root``) are tried newest checkpoint first. With
    ``config`` (the command's, as a plain dict) a run whose saved config.yaml differs in a key not matched by
    ``may_differ`` (:func:`key_allowed`), is missing or cannot be read is skipped; in a run, checkpoints that
    :func:`checkpoint_problem` rejects are skipped. Each skip warns with its reason. Raises :class:`ResumeError`
    when checkpoints exist but none may be resumed, naming why.
    """
    root = Path(root)
    if runs is None:
        runs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    by_run = {run: _checkpoints_newest_first(run) for run in runs}
    by_run = {run: ckpts for run, ckpts in by_run.items() if ckpts}
    if not by_run:
        return None
    order = sorted(by_run, key=lambda run: _saved_at(by_run[run][0]), reverse=True)
    refused: list[tuple[Path, str]] = []
    for run in order:
        if config is not None:
            saved_path = saved_config_path(run)
            if saved_path is None:
                refused.append((run, f"it has no {CONFIG_FILE} to compare this command's config with"))
                continue
            try:
                saved = read_saved_config(saved_path)
            except ResumeError as err:
                refused.append((run, str(err)))
                continue
            differences = [d for d in config_differences(saved, config) if not key_allowed(d[0], may_differ)]
            if differences:
                refused.append((run, f"its config differs: {describe_differences(differences)}"))
                continue
        for ckpt in by_run[run]:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                for other, why in refused:
                    warnings.warn(f"--ckpt_path last: not resuming {other} ({why})", stacklevel=2)
                return run, ckpt
            warnings.warn(f"--ckpt_path last: skipping {ckpt}: it {problem}", stacklevel=2)
        refused.append((run, "none of its checkpoints loads: " + ", ".join(p.name for p in by_run[run])))
    reasons = "\n".join(f"  {run}: {why}" for run, why in refused)
    newest = order[0]
    raise ResumeError(
        f"--ckpt_path last: no run under {root} can be resumed by this command:\n{reasons}\n"
        f"To resume a run with its own settings: corrpo fit --config {newest / CONFIG_FILE} --ckpt_path {newest} "
        "(--ckpt_path <run folder> names the run explicitly); to train more steps: --extend true with the larger "
        "model.rl.steps (or model.sft.steps); to continue with a deliberate change: --resume_may_differ "
        "'[<key>, ...]' (recorded in config.yaml); to start a new run, drop --ckpt_path or use another "
        "trainer.default_root_dir."
    )
