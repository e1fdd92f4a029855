"""``corrpo report <run | parent | latest>``: each run folder -> ``emergence.png`` and ``summary.md``, offline.

Why: a run's numbers sit in four files (``emergence.csv``, ``results.json``, ``config.yaml`` and the wandb
offline run); this gathers them on one Markdown page, without network or wandb login. It imports no Lightning:
``python -m corrpo.runs.report <run_dir>`` takes about a second.

The per-step RL reward is only in wandb: it is read from the run's transaction log
``wandb/*run-*/run-*.wandb`` with the wandb SDK's own offline reader, ``wandb leet inspect --json`` (wandb
0.31 has no Python reader any more, the old ``wandb.sdk.internal.datastore`` is gone: wandb-core reads it).
Without a wandb run, or with a wandb that cannot read it, the summary says the reward was not recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from corrpo.runs import analysis
from corrpo.runs.plotting import anatomy_figure, emergence_figure
from corrpo.runs.run_folder import ANATOMY_PREFIX, RunFolder
from corrpo.runs.wandb_segments import newest_run_logs

EVENTS = ("start", "boundary", "end")
MAX_REWARD_ROWS = 20


def wandb_records(path: str | Path, timeout: float = 120.0) -> tuple[list[dict], str | None]:
    """Every record of a ``run-*.wandb`` file as a dict (``type``: history, summary, ...), and a note on any problem.

    Runs ``python -m wandb leet inspect --json <path>`` offline (``WANDB_MODE=offline`` also turns off its
    telemetry upload). A torn tail (an interrupted run) still gives the records before it, with a note; a wandb
    without ``leet inspect`` or an unreadable file gives no records and the reason.
    """
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return [], f"`wandb leet inspect` failed: {error}"
    records = []
    for line in done.stdout.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    said = " ".join(done.stderr.split()[-40:])  # empty for a complete, readable log
    if done.returncode:
        return records, f"`wandb leet inspect` exited with {done.returncode}: {said}"
    return records, said or None


def wandb_history(path: str | Path, timeout: float = 120.0) -> tuple[list[dict], str | None]:
    """The ``history`` rows (``{key: value}``) of a ``run-*.wandb`` file, in order, and a note on any problem."""
    records, note = wandb_records(path, timeout)
    rows = [dict(r["history"].get("item", {})) for r in records if r.get("type") == "history" and "history" in r]
    return rows, note


def wandb_summary(path: str | Path, timeout: float = 120.0) -> dict:
    """The run summary at the end of a ``run-*.wandb`` file: every summary update merged in order."""
    summary: dict = {}
    for record in wandb_records(path, timeout)[0]:
        if record.get("type") == "summary":
            summary.update(record.get("summary", {}).get("update", {}))
    return summary


def find_wandb_logs(run_dir: str | Path) -> list[Path]:
    """Every ``run-*.wandb`` of the newest wandb run id under ``<run_dir>/wandb``, oldest first
    (:func:`corrpo.runs.wandb_segments.newest_run_logs`: a resumed run's history spans one file per session)."""
    return newest_run_logs(run_dir)


def find_wandb_log(run_dir: str | Path) -> Path | None:
    """The newest wandb run's newest ``run-*.wandb`` under ``<run_dir>/wandb`` (offline or online), else None."""
    logs = find_wandb_logs(run_dir)
    return logs[-1] if logs else None


def run_history(logs: list[Path]) -> tuple[list[dict], str | None]:
    """The history rows of a wandb run's segments (:func:`find_wandb_logs`: one per session of a resumed
    run), in order."""
    history, problems = [], []
    for part in logs:
        rows, problem = wandb_history(part)
        history.extend(rows)
        problems.extend([problem] if problem else [])
    return history, " ".join(problems) or None


REWARD_KEYS = ("rl/reward", "reward")
"""The RL reward in wandb history: ``rl/reward`` (TRL's name in the ``rl/`` section), ``reward`` in older runs."""


def _reward(row: dict) -> float | None:
    value = next((row[key] for key in REWARD_KEYS if key in row), None)
    return float(value) if isinstance(value, int | float) else None


def reward_curve(history: list[dict]) -> list[tuple[int, float]]:
    """``(trainer/global_step, reward)`` of every history row that logged the reward (RL steps only)."""
    return [
        (int(row.get("trainer/global_step", row.get("_step", -1))), _reward(row))
        for row in history
        if _reward(row) is not None
    ]


def downsample(rows: list, limit: int = MAX_REWARD_ROWS) -> list:
    """At most ``limit`` rows, evenly spaced, first and last kept."""
    if len(rows) <= limit:
        return list(rows)
    return [rows[round(i * (len(rows) - 1) / (limit - 1))] for i in range(limit)]


def _num(value) -> str:
    """A cell: integers as is, other numbers to 4 decimals, missing as ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return str(value) if isinstance(value, int) else f"{float(value):.4f}"


def _sparkline(values: list[float]) -> str:
    """A one-line text plot of ``values`` (eight levels between their min and max)."""
    low, high = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((v - low) / (high - low) * 7.999) if high > low else 3] for v in values)


def _config(run_dir: Path) -> dict:
    """The run's resolved ``config.yaml`` as a dict; empty when absent."""
    return RunFolder(run_dir).read_config()


def _get(config: dict, dotted: str):
    """``config["a"]["b"]`` for ``"a.b"``; None where a key is missing."""
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _reward_section(run_dir: Path, config: dict) -> list[str]:
    """Markdown lines of the RL reward: summary, text sparkline and a table of at most MAX_REWARD_ROWS rows."""
    log = find_wandb_log(run_dir)
    if log is None:
        return [f"Reward curve: not recorded (no wandb run under `{run_dir / 'wandb'}`)."]
    logs = find_wandb_logs(run_dir)
    source = ", ".join(f"`{part.relative_to(run_dir)}`" for part in logs)
    history, problem = run_history(logs)
    curve = sorted(dict(reward_curve(history)).items())  # a step logged twice (resumed run) keeps its later value
    note = [f"Note: {problem}"] if problem else []
    every = _get(config, "trainer.log_every_n_steps")
    every = f" (`trainer.log_every_n_steps` = {every})" if every else ""
    if not history and problem:
        return [f"Reward curve: not read from {source}.", "", *note]
    if not curve:
        return [f"Reward curve: not recorded ({source} holds no `reward`: no RL step was logged{every}).", "", *note]
    rewards = [r for _, r in curve]
    lines = [
        f"{len(curve)} RL steps logged{every} in {source}: first {_num(rewards[0])} (step {curve[0][0]}), last "
        f"{_num(rewards[-1])} (step {curve[-1][0]}), mean {_num(sum(rewards) / len(rewards))}, min "
        f"{_num(min(rewards))}, max {_num(max(rewards))}.",
        "",
        *(note + [""] if note else []),
        f"`{_sparkline(rewards)}`",
        "",
        "| step | reward |",
        "|---|---|",
    ]
    return lines + [f"| {step} | {_num(reward)} |" for step, reward in downsample(curve)]


def write_report(run_dir: str | Path) -> tuple[Path | None, Path]:
    """Write ``<run_dir>/emergence.png`` and ``<run_dir>/summary.md``; return their paths.

    A run without an inversion tracker (e.g. ``configs/grpo-baseline.yaml``: results.json but no emergence.csv)
    gets accuracy and rewards only, and no figure (its png path is None).

    Raises FileNotFoundError (with the path) with neither ``emergence.csv`` nor ``results.json``, or without
    ``results.json`` when the run finished (``end`` row in emergence.csv); an interrupted run without
    results.json is reported as such.
    """
    run = RunFolder(run_dir)
    run_dir = run.path
    csv_path, results_path = run.emergence, run.results
    tracked = csv_path.is_file()
    if not tracked and not results_path.is_file():
        raise FileNotFoundError(
            f"{csv_path} not found (nor {results_path.name}): not a corrpo run folder, or the run never started"
        )
    frame = analysis.load_emergence([run_dir]) if tracked else None
    finished = bool((frame["event"] == "end").any()) if tracked else True
    if finished and not results_path.is_file():
        raise FileNotFoundError(f"{results_path} not found, though emergence.csv has the run's 'end' row")
    results = run.read_results() if results_path.is_file() else None
    config = _config(run_dir)
    png_path = None
    if tracked:
        boundary = analysis.boundary_batches(frame)
        figure = emergence_figure(frame.to_dict("records"), boundary_batches=boundary)
        png_path = run.emergence_png
        figure.savefig(png_path, dpi=120)
        plt.close(figure)
        if any(c.startswith(ANATOMY_PREFIX) for c in frame.columns):
            figure = anatomy_figure(frame.to_dict("records"), boundary_batches=boundary)
            figure.savefig(run.anatomy_png, dpi=120)
            plt.close(figure)
    else:  # no curve: the boundary is where the config puts it
        sft, rl = _get(config, "model.sft.steps"), _get(config, "model.rl.steps")
        boundary = sft if sft and rl else None

    sft_steps, rl_steps = _get(config, "model.sft.steps"), _get(config, "model.rl.steps")
    coef = _get(config, "model.rl.inversion.coef")
    method = analysis.method_of(run_dir)
    if method == "run" and coef is not None:  # nothing in the folder names it: the config does
        method = "corrpo" if coef > 0 else "grpo"
    lines = [f"# Run report: {run_dir.name}", "", f"Folder: `{run_dir.resolve()}`", ""]
    if results is None:
        lines += [
            "**Interrupted run**: no `results.json` and no `end` row in emergence.csv; test accuracy after SFT and "
            "at the end, and skipped updates, were not recorded. Below is what the run wrote before it stopped.",
            "",
        ]
    lines += [
        f"Method: {method} (`model.rl.inversion.coef` = {coef if coef is not None else '-'})",
        "",
        "## Phases",
        f"- SFT: {sft_steps if sft_steps is not None else '-'} steps, then RL: "
        f"{rl_steps if rl_steps is not None else '-'} steps (config.yaml)",
        f"- SFT -> RL boundary at batch {int(boundary)} ({'emergence.csv' if tracked else 'config.yaml'})"
        if boundary is not None
        else "- SFT -> RL boundary: none (SFT only, or RL from the start)",
        "",
    ]
    lines += _inversion_section(frame) if tracked else [
        "## Entropy-gradient inversion",
        "Not measured: this run has no `callbacks.inversion.InversionTracker` (no emergence.csv); accuracy and "
        "rewards only.",
    ]  # fmt: skip
    lines += ["", "## Test accuracy (results.json)"]
    if results is None:
        lines.append("Not recorded (no results.json).")
    else:
        lines += ["| when | step | accuracy |", "|---|---|---|"]
        by_when = {r.get("when"): r for r in results.get("test_accuracy", [])}
        for when in ("start", "sft_end", "end"):
            r = by_when.get(when)
            lines.append(f"| {when} | {r['step']} | {_num(float(r['accuracy']))} |" if r else f"| {when} | - | - |")
        lines += ["", f"Skipped updates: {results.get('skipped_updates', '-')}"]
        lines += _eval_section(results.get("eval", []))
    lines += ["", "## RL reward (wandb history)", *_reward_section(run_dir, config), ""]
    md_path = run.summary_md
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return png_path, md_path


def _inversion_section(frame) -> list[str]:
    lines = [
        "## Entropy-gradient inversion (emergence.csv; strength = -spearman)",
        "| event | step | batches | phase | spearman | pearson | strength | n_tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for event in EVENTS:
        hits = frame[frame["event"] == event]
        if hits.empty:
            lines.append(f"| {event} | not recorded | | | | | | |")
            continue
        row = hits.iloc[-1]
        cells = [int(row["step"]), int(row["batches"]), row["phase"]]
        cells += [float(row[k]) for k in ("spearman", "pearson", "strength")] + [int(row["n_tokens"])]
        lines.append(f"| {event} | " + " | ".join(c if isinstance(c, str) else _num(c) for c in cells) + " |")
    lines += ["", "![emergence curve](emergence.png)"]
    factors = [c for c in frame.columns if c.startswith(ANATOMY_PREFIX)]
    if factors:
        lines += [
            "",
            "### Anatomy: Spearman(H, factor) (docs/inversion-anatomy.md)",
            "| event | " + " | ".join(c[len(ANATOMY_PREFIX) :] for c in factors) + " |",
            "|---|" + "---|" * len(factors),
        ]
        for event in EVENTS:
            hits = frame[frame["event"] == event]
            if not hits.empty:
                lines.append(f"| {event} | " + " | ".join(_num(float(hits.iloc[-1][c])) for c in factors) + " |")
        lines += ["", "![anatomy](anatomy.png)"]
    return lines


def _eval_section(entries: list[dict]) -> list[str]:
    """The ``model.eval`` results (greedy, pass@k, mean@k per eval set and point), when the run measured them."""
    keys = {k for e in entries for k in e if k.startswith(("pass@", "mean@"))}
    keys = sorted(keys, key=lambda k: (k[:4] != "pass", int(k.split("@")[1])))
    if not entries or (not keys and all(e.get("split") == "test" for e in entries)):
        return []
    header = ["when", "step", "eval set", "greedy", *keys]
    lines = ["", "## Evaluation (results.json `eval`; generations in eval_generations.jsonl)",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for e in entries:
        cells = [e.get("when"), str(e.get("step")), e.get("split"), _num(e.get("greedy_accuracy"))]
        lines.append("| " + " | ".join(cells + [_num(e.get(k)) for k in keys]) + " |")
    return lines


REPORT_HELP = """\
Summarise corrpo run folders offline: each run gets summary.md (phases, inversion at start / SFT end / end,
test accuracy, eval@k, the RL reward from the wandb offline log) and emergence.png (the inversion curve).

RUN may be a run folder (runs/tiny/20261201-101500), a parent folder (runs/tiny: every run below it), or
"latest" (the newest run under ./runs) or PARENT/latest (the newest run under PARENT). Runs without an
inversion tracker (configs/grpo-baseline.yaml) get accuracy and rewards only."""


def report_targets(arg: str | Path, default_root: str | Path = "runs") -> list[RunFolder]:
    """The run folders ``corrpo report ARG`` covers: ARG itself when it is a run, ``latest`` / ``PARENT/latest`` ->
    the newest run (by folder name, i.e. start time) under ./runs / PARENT, any other folder -> every run below it.
    A path that is none of these comes back as is, so that write_report names what is missing."""
    path = Path(arg)
    if path.name == "latest" and not path.is_dir():
        parent = Path(default_root) if str(arg) == "latest" else path.parent
        runs = _runs_below(parent)
        return [max(runs, key=lambda r: (r.path.name, str(r.path)))] if runs else [RunFolder(path)]
    if RunFolder(path).is_run() or not path.is_dir():
        return [RunFolder(path)]
    return _runs_below(path) or [RunFolder(path)]


def _runs_below(parent: Path) -> list[RunFolder]:
    """Every folder below ``parent`` holding emergence.csv or results.json, sorted."""
    found = {p.parent for name in ("emergence.csv", "results.json") for p in Path(parent).glob(f"**/{name}")}
    return [RunFolder(p) for p in sorted(found)]


def report_main(argv: list[str] | None = None) -> list[Path]:
    """``corrpo report RUN [RUN ...]``: write each run's report and print the paths written."""
    parser = argparse.ArgumentParser(
        prog="corrpo report", description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run folder, a parent folder, or latest")
    args = parser.parse_args(argv)
    written: list[Path] = []
    for target in [run for arg in args.runs for run in report_targets(arg)]:
        try:
            paths = write_report(target.path)
        except FileNotFoundError as error:
            parser.exit(1, f"corrpo report: error: {error}\n")
        for path in paths:
            if path is not None:
                print(path)
                written.append(path)
    return written


if __name__ == "__main__":
    report_main()
