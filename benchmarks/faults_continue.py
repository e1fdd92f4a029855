"""The crash campaign's continue-on-purpose scenarios (issue 28, items 5 and 6), registered by benchmarks/faults.py.

- ``extend-finished-run``: the run finishes with 1 RL step (exit 0, results.json written); ``--ckpt_path last`` with
  3 RL steps is refused naming ``model.rl.steps``; with ``--extend true`` it continues in the same folder. Its
  weights and emergence.csv must equal the uninterrupted 3-step run's (the data stream is step-indexed, RL's lr
  constant), config.yaml must record ``model.rl.steps`` 1 -> 3 under ``resumed_with_changes``, results.json 3 RL
  steps. (Before: refused, and with the check bypassed Lightning resumed the final checkpoint as a finished epoch:
  "max_epochs=1 reached", nothing trained.)
- ``changed-reward-after-crash``: SIGKILL as batch 5 starts (RL); the reward is changed (``reward_weights`` [1, 0.2]
  -> [1, 0.5]). ``--ckpt_path last`` is refused naming the key; with ``--resume_may_differ [model.rl.reward_weights]``
  it continues from the step-4 checkpoint and records the old weights. Its weights must equal a run stopped cleanly
  at step 4 (``trainer.max_steps``) and continued with the same change: the crash loses nothing.
- ``corrupt-newest-config``: run A is killed as batch 5 starts; run B, the same command started later, as batch 3
  starts, and its config.yaml is then cut in half. ``--ckpt_path last`` must skip B with a warning naming its
  config.yaml (not YAML, with its line, or cut short: what is left may parse), resume A from its step-4 checkpoint
  and equal the uninterrupted run. (Before: a raw YAML
  error, nothing resumed.)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml

from corrpo.runs.run_folder import RunFolder

FIXED_REWARD = ["--model.rl.reward_weights=[1.0, 0.5]"]


def continuation_scenarios(campaign, outcome: Callable, checkpoints_left: Callable) -> dict[str, Callable]:
    """The scenarios, by name, for faults.py's plan (``outcome``: its Outcome class; ``checkpoints_left``: its
    description of a run's checkpoints)."""
    return {
        "extend-finished-run": partial(_extend, campaign, outcome, checkpoints_left),
        "changed-reward-after-crash": partial(_changed_reward, campaign, outcome, checkpoints_left),
        "corrupt-newest-config": partial(_corrupt_newest_config, campaign, outcome, checkpoints_left),
    }


def _quiet(run: Callable, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(*args)


def _refused(campaign, root: Path, tmpdir: Path, *extra: str) -> str | None:
    """The ResumeError message of ``--ckpt_path last`` with ``extra``; None when it was not refused."""
    from corrpo.runs.resume import ResumeError

    try:
        _quiet(campaign.run_here, root, tmpdir, *extra, "--ckpt_path=last")
    except ResumeError as err:
        return str(err)
    return None


def _compare(out, cli, run: Path, weights: dict, csv: str | None) -> None:
    resumed = cli.model.policy.state_dict()
    out.diff = max((resumed[k] - weights[k]).abs().max().item() for k in weights)
    out.csv_same = csv is None or RunFolder(run).emergence.read_text() == csv
    out.resumed_from = Path(cli.config.fit.ckpt_path).name.removesuffix(".ckpt") if cli.config.fit.ckpt_path else "-"
    out.resumed_from = out.resumed_from.replace("epoch=0-step=", "step")
    if Path(cli.trainer.default_root_dir) != run:
        out.intact.append(f"continued in {cli.trainer.default_root_dir}, not {run}")
    if not RunFolder(run).results.is_file():
        out.intact.append("no results.json")


def _recorded(run: Path, key: str, old, new) -> bool:
    entries = yaml.safe_load(RunFolder(run).config.read_text()).get("resumed_with_changes") or []
    return any(e.get("changes", {}).get(key) == {"old": old, "new": new} for e in entries)


def _extend(campaign, outcome, checkpoints_left):
    out = outcome("extend-finished-run")
    root, tmpdir = campaign.work / out.name, campaign.work / f"tmp-{out.name}"
    tmpdir.mkdir(parents=True)
    out.exits.append(campaign.child(root, tmpdir, "none", extra=["--model.rl.steps=1"]))
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    finished = RunFolder(run).read_results().get("steps_run") if RunFolder(run).results.is_file() else None
    out.left = checkpoints_left(run)
    refused = _refused(campaign, root, tmpdir)
    try:
        cli = _quiet(campaign.run_here, root, tmpdir, "--ckpt_path=last", "--extend=true")
    except Exception as err:  # noqa: BLE001 - a failed extension is a row of the table
        out.intact.append(f"extension failed: {err!r:.80}")
        return out
    _compare(out, cli, run, campaign.reference_weights, campaign.reference_csv)
    recorded = _recorded(run, "model.rl.steps", 1, 3)
    steps = RunFolder(run).read_results().get("steps_run") if RunFolder(run).results.is_file() else None
    ok = finished == {"sft": 3, "rl": 1} and refused and "model.rl.steps" in refused and recorded
    out.evidence = "finished at 1 RL step; refused w/o --extend; 1->3 recorded" if ok else "NO finished+refused+record"
    if steps != {"sft": 3, "rl": 3}:
        out.intact.append(f"results.json steps_run {steps}")
    out.exact = out.diff == 0.0 and out.csv_same and out.exits == [0] and ok
    return out


def _changed_reward(campaign, outcome, checkpoints_left):
    out = outcome("changed-reward-after-crash")
    reference_root, reference_tmp = campaign.work / "reference-changed", campaign.work / "tmp-reference-changed"
    _quiet(campaign.run_here, reference_root, reference_tmp, "--trainer.max_steps=4")
    allow = "--resume_may_differ=[model.rl.reward_weights]"
    reference = _quiet(campaign.run_here, reference_root, reference_tmp, *FIXED_REWARD, allow, "--ckpt_path=last")
    weights = {k: v.clone() for k, v in reference.model.policy.state_dict().items()}
    root, tmpdir = campaign.work / out.name, campaign.work / f"tmp-{out.name}"
    tmpdir.mkdir(parents=True)
    out.exits.append(campaign.child(root, tmpdir, "kill-step", 5))
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    out.left = checkpoints_left(run)
    refused = _refused(campaign, root, tmpdir, *FIXED_REWARD)
    try:
        cli = _quiet(campaign.run_here, root, tmpdir, *FIXED_REWARD, allow, "--ckpt_path=last")
    except Exception as err:  # noqa: BLE001
        out.intact.append(f"continuation failed: {err!r:.80}")
        return out
    _compare(out, cli, run, weights, RunFolder(reference.trainer.default_root_dir).emergence.read_text())
    ok = bool(refused and "model.rl.reward_weights[1]" in refused) and _recorded(
        run, "model.rl.reward_weights[1]", 0.2, 0.5
    )
    out.evidence = "refused w/o the key list; 0.2->0.5 recorded" if ok else "NO refusal+record"
    out.exact = out.diff == 0.0 and out.csv_same and out.exits == [-9] and ok
    return out


def _corrupt_newest_config(campaign, outcome, checkpoints_left):
    out = outcome("corrupt-newest-config")
    root, tmpdir = campaign.work / out.name, campaign.work / f"tmp-{out.name}"
    tmpdir.mkdir(parents=True)
    out.exits.append(campaign.child(root, tmpdir, "kill-step", 5))
    (run_a,) = [p for p in root.iterdir() if p.is_dir()]
    time.sleep(1.1)  # B's folder gets its own timestamp
    out.exits.append(campaign.child(root, tmpdir, "kill-step", 3))
    (run_b,) = [p for p in root.iterdir() if p.is_dir() and p != run_a]
    text = RunFolder(run_b).config.read_text()
    RunFolder(run_b).config.write_text(text[: len(text) // 2])
    out.left = f"A: {checkpoints_left(run_a)}; B: {checkpoints_left(run_b)}"
    config_a = RunFolder(run_a).config.read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cli = campaign.run_here(root, tmpdir, "--ckpt_path=last")
        except Exception as err:  # noqa: BLE001
            out.intact.append(f"resume failed: {err!r:.80}")
            return out
    said = [str(w.message) for w in caught if f"not resuming {run_b}" in str(w.message)]
    named = bool(said) and ("config.yaml is cut short" in said[0] or "not valid YAML" in said[0])
    why = "not YAML" if named and "not valid YAML" in said[0] else "cut short"
    out.evidence = f"B skipped: its config.yaml named ({why})" if named else "NO warning naming B's config.yaml"
    _compare(out, cli, run_a, campaign.reference_weights, campaign.reference_csv)
    if RunFolder(run_a).config.read_bytes() != config_a:
        out.intact.append("run A's config.yaml changed")
    out.exact = out.diff == 0.0 and out.csv_same and out.exits == [-9, -9] and named
    return out
