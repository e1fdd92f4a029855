"""The crash campaign's export and evaluation scenarios (issue 28, items 2 and 7), registered by benchmarks/faults.py.

- ``kill-in-train-end-off-interval``: a checkpoint every 4 steps, so the 6-step run's last step is no multiple of the
  interval (configs/tiny.yaml: 530 steps, every 100); SIGKILL as ``on_train_end`` starts (training done, nothing
  exported). The resume must finish the export: ``policy/`` equal to the uninterrupted run's weights, results.json.
  (Before: the final checkpoint was an epoch-end one, the resume printed "max_epochs=1 reached", exited 0, wrote
  nothing.)
- ``enospc-export``: the same interval; the disk fills while ``policy/model.safetensors`` is written (half the file,
  then ENOSPC, emulated). The child exits 1 with no results.json; the resume finishes the export.
- ``eval-across-resume``: periodic evaluations every 2 steps (greedy and pass@2) with every completion saved, a
  SIGKILL as batch 5 starts, after the evaluation at step 4 wrote its rows and after the step-4 checkpoint. The
  resumed run's results.json evaluations and eval_generations.jsonl must equal an uninterrupted run's: the step-4
  evaluation present once (it used to run after the checkpoint: missing after a resume), no row repeated.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from functools import partial
from pathlib import Path

from corrpo.runs.run_folder import RunFolder

EVAL = ["--model.eval.every_n_steps=2", "--model.eval.k=2", "--model.eval.save_generations=true"]
EXPORT_FAULTS = ("enospc-export",)


def install_export_fault(fault: str) -> None:
    """In the child: ``enospc-export`` makes the final export (``policy/``'s temp folder, not ``policy-sft/``) run out
    of space half-way through writing its weights file."""
    if fault != "enospc-export":
        return
    import transformers.modeling_utils as modeling_utils

    real_save = modeling_utils.safe_save_file

    def save(tensors, filename, *args, **kwargs):
        if ".policy.partial-" not in str(filename):
            return real_save(tensors, filename, *args, **kwargs)
        real_save(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (emulated, while policy/ was written)")

    modeling_utils.safe_save_file = save


def export_scenarios(campaign, outcome: Callable, checkpoints_left: Callable) -> dict[str, Callable]:
    """The scenarios, by name, for faults.py's plan (``outcome``: its Outcome class; ``checkpoints_left``: its
    description of a run's checkpoints)."""
    off = partial(_off_interval, campaign, outcome, checkpoints_left)
    return {
        "kill-in-train-end-off-interval": partial(off, "kill-in-train-end-off-interval", "kill-end", -9),
        "enospc-export": partial(off, "enospc-export", "enospc-export", 1),
        "eval-across-resume": partial(_eval_across_resume, campaign, outcome, checkpoints_left),
    }


def _every_4_config(campaign) -> Path:
    path = campaign.work / "faults-every4.yaml"
    text = campaign.config.read_text()
    if "every_n_train_steps: 2" not in text:
        raise RuntimeError(f"{campaign.config} has no 'every_n_train_steps: 2' to change")
    path.write_text(text.replace("every_n_train_steps: 2", "every_n_train_steps: 4"))
    return path


def _policy_problem(run: Path, reference: dict) -> str | None:
    """Why ``run``'s exported policy/ is not the uninterrupted run's final weights; None when it is."""
    import torch
    from safetensors.torch import load_file

    weights = RunFolder(run).policy / "model.safetensors"
    if not weights.is_file():
        return "no policy/model.safetensors"
    exported = load_file(weights)
    differ = [k for k, v in exported.items() if k not in reference or not torch.equal(v, reference[k])]
    return f"policy/ differs in {len(differ)} tensors" if differ else None


def _off_interval(campaign, outcome, checkpoints_left, name: str, fault: str, exit_code: int):
    out = outcome(name)
    root, tmpdir = campaign.work / name, campaign.work / f"tmp-{name}"
    tmpdir.mkdir(parents=True)
    config, campaign.config = campaign.config, _every_4_config(campaign)
    try:
        out.exits.append(campaign.child(root, tmpdir, fault))
        (run,) = [p for p in root.iterdir() if p.is_dir()]
        unfinished = not RunFolder(run).results.exists()
        if fault == "kill-end":
            out.evidence = "killed in on_train_end, no results.json" if unfinished else "NO: results.json written"
        else:
            seen = "No space left on device" in campaign.last_output and "write_policy" in campaign.last_output
            out.evidence = "ENOSPC while policy/ was written" if seen and unfinished else "NO ENOSPC in the export"
        out.left = checkpoints_left(run)
        campaign.finish(out, root, tmpdir, run, RunFolder(run).config.read_bytes())
    finally:
        campaign.config = config
    problem = _policy_problem(run, campaign.reference_weights)
    out.intact += [problem] if problem else []
    out.intact += [f"temp copy {p.name}" for p in run.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    out.exact = out.exact and out.exits == [exit_code] and not out.evidence.startswith("NO")
    return out


def _eval_across_resume(campaign, outcome, checkpoints_left):
    import warnings

    out = outcome("eval-across-resume")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = campaign.run_here(campaign.work / "reference-eval", campaign.work / "tmp-reference-eval", *EVAL)
    whole = RunFolder(reference.trainer.default_root_dir)
    weights = {k: v.clone() for k, v in reference.model.policy.state_dict().items()}
    root, tmpdir = campaign.work / out.name, campaign.work / f"tmp-{out.name}"
    tmpdir.mkdir(parents=True)
    out.exits.append(campaign.child(root, tmpdir, "kill-step", 5, extra=EVAL))
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    written = [(r["when"], r["step"]) for r in RunFolder(run).read_eval_generations()]
    out.evidence = "step-4 eval rows written, then killed" if ("periodic", 4) in written else "NO step-4 eval rows"
    out.left = checkpoints_left(run)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = campaign.run_here(root, tmpdir, *EVAL, "--ckpt_path=last")
    except Exception as err:  # noqa: BLE001 - a failed resume is a row of the table
        out.intact.append(f"resume failed: {err!r:.80}")
        return out
    out.resumed_from = Path(cli.config.fit.ckpt_path).name.removesuffix(".ckpt") if cli.config.fit.ckpt_path else "-"
    resumed = cli.model.policy.state_dict()
    out.diff = max((resumed[k] - weights[k]).abs().max().item() for k in weights)
    out.csv_same = RunFolder(run).emergence.read_text() == whole.emergence.read_text()
    one, cut = whole.read_results(), RunFolder(run).read_results()
    for key in ("test_accuracy", "eval"):
        if one.get(key) != cut.get(key):
            out.intact.append(f"results.json {key} differs")
    if RunFolder(run).read_eval_generations() != whole.read_eval_generations():
        n_whole, n_cut = len(whole.read_eval_generations()), len(RunFolder(run).read_eval_generations())
        out.intact.append(f"eval_generations.jsonl differs ({n_cut} rows, uninterrupted {n_whole})")
    out.exact = out.diff == 0.0 and out.csv_same and out.exits == [-9] and not out.evidence.startswith("NO")
    return out
