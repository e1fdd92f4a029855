"""Continue a run on purpose: more steps (``--extend true``) or a deliberate change (``--resume_may_differ``).

A resume (``--ckpt_path last`` / ``<run folder>``) is refused when the command's config differs from the run's
config.yaml (:mod:`corrpo.runs.resume`). Two reasons to continue anyway are common and safe when said out loud:

- **More steps.** ``--extend true`` lets ``model.rl.steps`` (and ``model.sft.steps`` while RL has not started)
  grow. Every step's batch is a function of ``(seed, step)`` alone (:mod:`corrpo.data.datamodule`), so the
  extension trains what an uninterrupted run of the new length trains, bit for bit, where nothing else depends on
  the length: a phase's cosine lr schedule does (``min_lr_ratio < 1``; RL's default 1 keeps it constant), so
  does a reward that reads ``trainer_state.max_steps``.
- **A fix.** ``--resume_may_differ '[model.rl.rewards, model.rl.reward_weights]'`` names the keys that may differ
  (a key allows everything below it; globs too); the resumed run uses the command's values.

Either way config.yaml is rewritten with the command's config, and its ``resumed_with_changes`` list gets an entry
with each changed key's old and new value, the step it changed at and the checkpoint resumed, so the run's record
says what trained when. ``--ckpt_path <checkpoint file>`` compares the checkpoint's saved ``model`` settings with
the command the same way (:func:`checkpoint_differences`): its values never replace the command's.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from corrpo.runs.code_version import code_version, describe
from corrpo.runs.resume import (
    ResumeError,
    checkpoint_record,
    config_differences,
    describe_differences,
    flatten,
    key_allowed,
    read_saved_config,
    saved_config_path,
)

EXTEND_KEYS = ("model.sft.steps", "model.rl.steps")
"""What ``--extend true`` lets grow: the phase lengths."""

CHANGES_KEY = "resumed_with_changes"
VERSION_KEY = "code_version"


def add_continuation_arguments(parser) -> None:
    """The top-level options of a resume, and the two keys corrpo writes into config.yaml (so a run's config.yaml
    still parses as ``--config``); the resume comparison ignores all four."""
    parser.add_argument(
        "--extend", type=bool, default=False,
        help="With --ckpt_path: the run may continue with more steps (larger model.rl.steps, or model.sft.steps "
        "while RL has not started); the change is recorded in config.yaml under resumed_with_changes.",
    )  # fmt: skip
    parser.add_argument(
        "--resume_may_differ", type=list[str], default=[],
        help="With --ckpt_path: config keys that may differ from the run's config.yaml or the checkpoint's "
        "settings, e.g. '[model.rl.rewards, model.rl.reward_weights]' (a key covers everything below it; globs "
        "allowed). The command's values are used and recorded with the old ones under resumed_with_changes.",
    )  # fmt: skip
    parser.add_argument(
        f"--{CHANGES_KEY}", type=list[dict] | None, default=None,
        help="Written by corrpo, not to be set: each resume that changed the config, with the old and new values.",
    )  # fmt: skip
    parser.add_argument(
        f"--{VERSION_KEY}", type=dict | None, default=None,
        help="Written by corrpo, not to be set: the corrpo version, git commit and dirty flag that started the run.",
    )  # fmt: skip


def may_differ(extend: bool, listed: list[str] | tuple[str, ...], subcommand: str = "fit") -> tuple[str, ...]:
    """The keys a command allows to differ: those listed, the phase lengths with ``--extend`` or when the command
    only evaluates (validate / test train nothing, so how long the run trained changes nothing they measure)."""
    keys = tuple(listed or ())
    return keys + EXTEND_KEYS if extend or subcommand != "fit" else keys


def allowed_keys(config, command: dict, subcommand: str) -> tuple[str, ...]:
    """The keys the command (``config``: its namespace; ``command``: the same as a plain dict) allows to differ,
    after checking that each ``--resume_may_differ`` entry names a key of its config."""
    check_listed_keys(config.get("resume_may_differ"), command)
    return may_differ(config.get("extend"), config.get("resume_may_differ"), subcommand)


def check_listed_keys(listed: list[str] | tuple[str, ...], *configs: dict) -> None:
    """A ``--resume_may_differ`` entry that names no key of the command's or the run's config (a typo) is an error
    naming it: it would silently allow nothing."""
    known = set()
    for config in configs:
        known.update(flatten(config or {}))
    unknown = [key for key in listed or () if not any(key_allowed(k, (key,)) for k in known)]
    if unknown:
        raise ResumeError(
            f"--resume_may_differ: {', '.join(unknown)} is no key of the config (keys are dotted, e.g. "
            "model.rl.rewards, model.rl.steps, trainer.max_steps)"
        )


def _steps(config: dict, phase: str) -> int:
    value = ((config or {}).get("model") or {}).get(phase) or {}
    return int(value.get("steps") or 0) if isinstance(value, dict) else int(getattr(value, "steps", 0) or 0)


def check_schedule(old: dict, new: dict, steps_done: int | None, where: str) -> None:
    """Refuse a schedule a checkpoint cannot continue in: fewer steps in all than it has done, or an SFT phase that
    changed length after it ended (the RL steps done would then be other batches). ``old`` / ``new``: configs with
    a ``model`` mapping (the run's and the command's)."""
    if steps_done is None:
        return
    old_sft, new_sft = _steps(old, "sft"), _steps(new, "sft")
    total = new_sft + _steps(new, "rl")
    if total < steps_done:
        raise ResumeError(
            f"{where} has done {steps_done} steps; this command plans {total} (model.sft.steps={new_sft}, "
            f"model.rl.steps={_steps(new, 'rl')}): a run cannot continue to fewer steps than it has done"
        )
    if old_sft != new_sft and steps_done > min(old_sft, new_sft):
        raise ResumeError(
            f"{where} has done {steps_done} steps of which {min(old_sft, steps_done)} SFT: model.sft.steps cannot "
            f"change from {old_sft} to {new_sft} once that many steps are done (only the phase still running, or "
            "RL, can be extended)"
        )


def allowed_changes(
    saved: dict, command: dict, extend: bool, listed: list[str] | tuple[str, ...]
) -> list[tuple[str, Any, Any]]:
    """The differences between the run's config (``saved``) and the command's that the command allows (each
    ``(key, old, new)``). Under ``--extend`` alone a phase length may only grow."""
    listed = tuple(listed or ())
    changes = [d for d in config_differences(saved, command) if key_allowed(d[0], may_differ(extend, listed))]
    for key, old, new in changes:
        shrinks = isinstance(old, int) and isinstance(new, int) and new < old
        if key in EXTEND_KEYS and shrinks and not key_allowed(key, listed):
            raise ResumeError(
                f"--extend: {key} would shrink from {old} to {new}; an extension only adds steps (stop earlier with "
                f"--trainer.max_steps, or list {key} in --resume_may_differ)"
            )
    return changes


def change_record(changes: list[tuple[str, Any, Any]], checkpoint: Path, steps_done: int | None) -> dict:
    """config.yaml's entry for one resume with changes: when, at which step, from which checkpoint, by which code,
    and each key's old and new value."""
    return {
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "steps_done": steps_done,
        "checkpoint": str(checkpoint),
        VERSION_KEY: code_version(),
        "changes": {key: {"old": old, "new": new} for key, old, new in changes},
    }


def checkpoint_differences(hyper_parameters: dict, command_model: dict) -> list[tuple[str, Any, Any]]:
    """``(model.<key>, checkpoint value, command value)`` for every setting the checkpoint saved that the command
    sets otherwise. Only the checkpoint's keys are compared (what the module saves: not the rollout engine)."""
    saved = flatten(hyper_parameters, "model")
    current = flatten(command_model or {}, "model")
    return [(k, v, current.get(k, "<unset>")) for k, v in sorted(saved.items()) if current.get(k, "<unset>") != v]


def version_note(saved: dict) -> str | None:
    """A note when the run was started by other code than this (None when the same, or unrecorded)."""
    recorded = (saved or {}).get(VERSION_KEY)
    now = code_version()
    if not isinstance(recorded, dict) or (recorded.get("corrpo"), recorded.get("commit")) == (
        now.get("corrpo"),
        now.get("commit"),
    ):
        return None
    return f"the run was started by {describe(recorded)}; it continues with {describe(now)}"


def continue_on_purpose(config, command: dict, subcommand: str, resume: tuple[Path, Path] | None) -> dict | None:
    """The CLI's checks and records of a command with ``--ckpt_path`` (``config``: the subcommand's namespace,
    ``command``: the same as a plain dict, ``resume``: the run and checkpoint ``last`` / a run folder chose).

    - a resumed run (``fit``): the allowed differences from its config.yaml become a ``resumed_with_changes`` entry
      and ``code_version`` stays the run's; the schedule must suit the checkpoint's steps done. When there are
      changes, returns what config.yaml keeps of its own in the rewrite (its ``ckpt_path``, and no ``--extend`` /
      ``--resume_may_differ``: they were this resume's, the entry records them); else None;
    - a checkpoint file (any subcommand), or a run evaluated by validate / test: its saved ``model`` settings must
      equal the command's, up to the allowed keys; they are compared, never used;
    - a new run: ``code_version`` is this code's.
    """
    allowed = allowed_keys(config, command, subcommand)
    ckpt_path = config.get("ckpt_path")
    config[VERSION_KEY] = code_version()
    config[CHANGES_KEY] = None  # a new run (or an evaluation) from a run's config.yaml: that run's record is not its
    if not ckpt_path:
        return None
    record = checkpoint_record(ckpt_path)
    steps_done = record["steps_done"]
    if resume is not None and subcommand == "fit":
        saved = read_saved_config(saved_config_path(resume[0]))
        changes = allowed_changes(saved, command, config.get("extend"), config.get("resume_may_differ"))
        check_schedule(saved, command, steps_done, f"the run {resume[0]}")
        if note := version_note(saved):
            warnings.warn(note, stacklevel=3)
        config[VERSION_KEY] = saved.get(VERSION_KEY)
        history = list(saved.get(CHANGES_KEY) or [])
        if changes:
            history.append(change_record(changes, resume[1], steps_done))
            warnings.warn(f"--ckpt_path: continuing {resume[0]} with changes, recorded in its config.yaml: "
                          f"{describe_differences(changes, '{key}: {old!r} -> {new!r}')}", stacklevel=3)  # fmt: skip
        config[CHANGES_KEY] = history or None
        if not changes:
            return None
        listed = list(config.get("resume_may_differ") or [])
        history[-1]["options"] = {"extend": bool(config.get("extend")), "resume_may_differ": listed}
        return {"ckpt_path": saved.get("ckpt_path"), "extend": False, "resume_may_differ": []}
    differences = checkpoint_differences(record["hyper_parameters"], command.get("model"))
    refused = [d for d in differences if not key_allowed(d[0], allowed)]
    if refused:
        shown = describe_differences(refused, "{key}: {old!r} in the checkpoint, {new!r} in this command")
        raise ResumeError(
            f"--ckpt_path {ckpt_path} was trained with other settings than this command's: {shown}. The "
            "command's values are used, never the checkpoint's: pass the run's own config (--config "
            "<run>/config.yaml), set those keys, or allow them with --resume_may_differ '[<key>, ...]' (--extend "
            "true for more steps)"
        )
    if subcommand == "fit":
        check_schedule({"model": record["hyper_parameters"]}, command, steps_done, f"--ckpt_path {ckpt_path}")
    return None
