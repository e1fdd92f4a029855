"""``corrpo report <run | parent | latest>``: each run folder -> ``summary.md`` and its figures, offline.

Why: a run's numbers sit in four files (``emergence.csv``, ``results.json``, ``config.yaml`` and the wandb
offline run); this gathers them on one Markdown page with figures (``emergence.png``, ``anatomy.png``, and the
training curves ``reward.png``, ``accuracy.png``, ``completion_length.png`` of :mod:`corrpo.runs.curves`),
without network or wandb login. It imports no Lightning: ``python -m corrpo.runs.report <run_dir>`` takes
about a second.

The per-step scalars (the RL reward, completion length, ...) are only in the logger: :mod:`corrpo.runs.logged`
reads them from the run's wandb transaction log, else from a CSVLogger ``metrics.csv`` in the run folder.
Without either, or with a wandb that cannot read it, the summary says which curves were not recorded and why.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.pyplot as plt

from corrpo.runs import analysis
from corrpo.runs.curves import REWARD_KEYS, training_curves
from corrpo.runs.logged import Logged, logged_metrics
from corrpo.runs.logged import find_wandb_log as find_wandb_log  # re-exported: tests and benchmarks import the
from corrpo.runs.logged import find_wandb_logs as find_wandb_logs  # readers from here, where they lived first
from corrpo.runs.logged import metrics_csv_history as metrics_csv_history
from corrpo.runs.logged import run_history as run_history
from corrpo.runs.logged import wandb_history as wandb_history
from corrpo.runs.logged import wandb_records as wandb_records
from corrpo.runs.logged import wandb_summary as wandb_summary
from corrpo.runs.plotting import anatomy_figure, curves_figure, emergence_figure
from corrpo.runs.run_folder import ANATOMY_PREFIX, RunFolder

EVENTS = ("start", "boundary", "end")
MAX_REWARD_ROWS = 20


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


def _config(run_dir: Path) -> dict:
    """The run's resolved ``config.yaml`` as a dict; empty when absent."""
    return RunFolder(run_dir).read_config()


def _get(config: dict, dotted: str):
    """``config["a"]["b"]`` for ``"a.b"``; None where a key is missing."""
    for key in dotted.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def _every(config: dict) -> str:
    every = _get(config, "trainer.log_every_n_steps")
    return f" (`trainer.log_every_n_steps` = {every})" if every else ""


def _no_rl_reason(run_dir: Path, config: dict, logged: Logged) -> str:
    """Why a run has no RL curve: no RL phase, no logger output, an unreadable log, or no RL step logged."""
    if _get(config, "model.rl.steps") == 0:
        return "SFT only (`model.rl.steps` = 0)"
    if logged.source is None:
        return f"no logged metrics (no wandb run under `{run_dir / 'wandb'}`, no metrics.csv)"
    if not logged.rows and logged.problem:
        return f"the logged metrics in {logged.source} could not be read ({logged.problem})"
    return f"no RL step was logged{_every(config)}"


def _reward_section(run_dir: Path, config: dict, logged: Logged) -> list[str]:
    """Markdown lines of the RL reward: summary and a table of at most MAX_REWARD_ROWS rows (the figure is in the
    training curves section)."""
    if logged.source is None:
        return [f"Reward curve: not recorded (no wandb run under `{run_dir / 'wandb'}`, no metrics.csv)."]
    source, every = logged.source, _every(config)
    curve = sorted(dict(reward_curve(logged.rows)).items())  # a step logged twice (resumed run) keeps its later value
    note = [f"Note: {logged.problem}"] if logged.problem else []
    if not logged.rows and logged.problem:
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
        "| step | reward |",
        "|---|---|",
    ]
    return lines + [f"| {step} | {_num(reward)} |" for step, reward in downsample(curve)]


def _boundary_step(config: dict, results: dict | None) -> int | None:
    """The optimizer step of the SFT->RL boundary: results.json's ``sft_end`` evaluation step, else
    ``model.sft.steps``; None without both phases."""
    sft, rl = _get(config, "model.sft.steps"), _get(config, "model.rl.steps")
    if not sft or rl == 0:
        return None
    ends = [e["step"] for e in (results or {}).get("test_accuracy", []) if e.get("when") == "sft_end"]
    return int(ends[-1]) if ends else int(sft)


def write_curves(run: RunFolder, config: dict, results: dict | None, logged: Logged) -> tuple[list[Path], list[str]]:
    """Draw the training curves (:func:`corrpo.runs.curves.training_curves`) into the run folder; return the
    figures written and the summary's lines: each figure embedded, or a line saying why it is not drawn."""
    written: list[Path] = []
    lines = ["## Training curves (per optimizer step; red dashed: SFT -> RL)"]
    boundary = _boundary_step(config, results)
    for curves in training_curves(logged.rows, results, _no_rl_reason(run.path, config, logged)):
        path = run.path / f"{curves.name}.png"
        if curves.missing is not None:
            lines.append(f"- `{path.name}` not drawn: {curves.missing}.")
            continue
        figure = curves_figure(curves, boundary_step=boundary)
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
        lines += ["", f"![{curves.title}]({path.name})"]
    return written, lines


def write_report(run_dir: str | Path) -> list[Path]:
    """Write ``<run_dir>/summary.md`` and its figures; return the paths written, ``summary.md`` last.

    The figures: ``emergence.png`` (and ``anatomy.png`` with the tracker's anatomy columns) from emergence.csv,
    then the training curves ``reward.png``, ``accuracy.png``, ``completion_length.png`` (:func:`write_curves`),
    each left out, with the reason in summary.md, when the run has nothing to show (SFT only, no evaluation,
    nothing logged). A run without an inversion tracker (e.g. ``configs/grpo-baseline.yaml``: results.json but
    no emergence.csv) has no emergence figure.

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
    written: list[Path] = []
    if tracked:
        boundary = analysis.boundary_batches(frame)
        figure = emergence_figure(frame.to_dict("records"), boundary_batches=boundary)
        figure.savefig(run.emergence_png, dpi=120)
        plt.close(figure)
        written.append(run.emergence_png)
        if any(c.startswith(ANATOMY_PREFIX) for c in frame.columns):
            figure = anatomy_figure(frame.to_dict("records"), boundary_batches=boundary)
            figure.savefig(run.anatomy_png, dpi=120, bbox_inches="tight")  # its legend is outside the axes
            plt.close(figure)
            written.append(run.anatomy_png)
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
    logged = logged_metrics(run_dir)
    figures, curve_lines = write_curves(run, config, results, logged)
    lines += ["", *curve_lines]
    lines += ["", "## RL reward (logged history)", *_reward_section(run_dir, config, logged), ""]
    run.summary_md.write_text("\n".join(lines), encoding="utf-8")
    return [*written, *figures, run.summary_md]


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
test accuracy, eval@k, the RL reward from the wandb offline log or a metrics.csv) and its figures:
emergence.png (the inversion curve), reward.png (the RL reward and its parts), accuracy.png (test and eval
accuracy, the accuracy reward on RL samples) and completion_length.png. A figure with nothing to show (SFT
only, no evaluation, nothing logged) is left out, and summary.md says why. Every file written is printed.

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
            print(path)
            written.append(path)
    return written


if __name__ == "__main__":
    report_main()
