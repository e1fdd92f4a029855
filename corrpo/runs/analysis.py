"""Loading and plotting run results for notebooks/emergence.ipynb: emergence curves and accuracy vs inversion.

A run folder holds ``emergence.csv`` (one row per probe measurement: ``batches``, ``phase``, ``event``,
``spearman``, ``pearson``, ...) and, after a finished fit, ``results.json`` (``test_accuracy``: a list of
``{when, step, accuracy}``; optionally ``method``). Inversion strength is ``-spearman``: higher = stronger.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt  # the backend is the caller's: inline in a notebook, Agg when headless
import pandas as pd

from corrpo.runs.run_folder import RunFolder, find_runs

__all__ = [
    "boundary_batches",
    "expand_run_dirs",
    "final_numbers",
    "final_points",
    "load_emergence",
    "load_wandb",
    "method_of",
    "plot_accuracy_vs_inversion",
    "plot_emergence",
    "repo_root",
    "run_dirs_from_env",
    "run_legend",
    "seed_of",
    "short_label",
]


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Each path that holds an ``emergence.csv`` as is; any other folder -> every run folder below it, sorted
    (:func:`corrpo.runs.run_folder.find_runs`). So ``runs/tiny`` works as well as ``runs/tiny/<timestamp>``."""
    return [run.path for run in find_runs(paths)]


REPO_ENV = "CORRPO_REPO"
"""The checkout to take relative paths from, when set (overrides the search of :func:`repo_root`)."""


def _is_checkout(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / "corrpo").is_dir()


def repo_root(start: str | Path | None = None) -> Path:
    """The checkout's root: ``$CORRPO_REPO`` when set; else the first of ``start`` (default the working directory)
    and its parents that holds ``pyproject.toml`` and ``corrpo/``; else the checkout this ``corrpo`` was imported
    from (an editable install); else ``start`` itself. So a notebook's kernel finds the same folder whether it
    starts in notebooks/, in the root or anywhere else."""
    if os.environ.get(REPO_ENV, "").strip():
        return Path(os.environ[REPO_ENV].strip()).expanduser().resolve()
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if _is_checkout(folder):
            return folder
    package_checkout = Path(__file__).resolve().parents[2]  # <checkout>/corrpo/runs/analysis.py
    return package_checkout if _is_checkout(package_checkout) else here


def run_dirs_from_env(
    default_root: str | Path = "runs", env: str = "CORRPO_RUNS", base: str | Path | None = None
) -> list[Path]:
    """Run folders from ``$CORRPO_RUNS`` (``os.pathsep``-separated), else every ``<root>/**/emergence.csv``.

    Relative paths are taken from ``base`` (the notebook passes the repository root, so ``CORRPO_RUNS=runs/tiny``
    means the same folder whether the kernel starts in the root or in notebooks/). Folders are expanded by
    :func:`expand_run_dirs`.
    """
    value = os.environ.get(env, "").strip()
    paths = [p for p in value.split(os.pathsep) if p] if value else [default_root]
    if base is not None:
        paths = [Path(base) / p if not Path(p).is_absolute() else Path(p) for p in paths]
    return expand_run_dirs(paths) if value or Path(paths[0]).is_dir() else []


def method_of(run_dir: str | Path) -> str:
    """``method`` from results.json; else ``corrpo``/``grpo`` if the run folder (or its parent) says so; else ``run``.

    Only the last two path parts are read, so a checkout that happens to live in a folder named ``corrpo``
    does not label every run.
    """
    method = RunFolder(run_dir).read_results().get("method")
    if isinstance(method, str) and method:
        return method
    for part in reversed(Path(run_dir).resolve().parts[-2:]):
        name = part.lower()
        if "corrpo" in name or "corr-po" in name:
            return "corrpo"
        if "grpo" in name:
            return "grpo"
    return "run"


def seed_of(run_dir: str | Path) -> int | None:
    """The run's seed: results.json's ``seed`` tag (``benchmarks/compare.py``), else its ``seeds``
    (``seed_everything``, else the model's), else config.yaml's ``seed_everything``; None when none is recorded."""
    run = RunFolder(run_dir)
    results = run.read_results()
    seeds = results.get("seeds") if isinstance(results.get("seeds"), dict) else {}
    for value in (results.get("seed"), seeds.get("seed_everything"), seeds.get("model")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    value = run.read_config().get("seed_everything") if run.config.is_file() else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def short_label(text: str, width: int = 32) -> str:
    """``text`` cut in the middle to at most ``width`` characters (head and tail kept: a run's label differs in
    its folder names and its timestamp), so that legends and annotations stay readable."""
    if len(text) <= width:
        return text
    head = (width - 1) // 4
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


def run_legend(run: str, method: str, seed) -> str:
    """One run's legend entry: its method, its (shortened) label and its seed, so that runs of one method and
    seeds of one setting are told apart."""
    has_seed = seed is not None and not (isinstance(seed, float) and math.isnan(seed))
    return f"{method}: {short_label(str(run))}" + (f" (seed {int(seed)})" if has_seed else "")


def _labels(run_dirs: list[Path]) -> list[str]:
    """The folder name (``parent/name`` for timestamp or ``version_N`` folders), or the path where names clash."""
    names = [f"{d.parent.name}/{d.name}" if re.match(r"\d|version_", d.name) else d.name for d in map(Path, run_dirs)]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs, strict=True)]


def load_emergence(run_dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All runs' ``emergence.csv`` rows in one frame, plus ``run`` (label), ``method`` and ``run_dir`` columns.

    Folders are expanded by :func:`expand_run_dirs` (a parent of several runs gives all of them).
    """
    run_dirs = expand_run_dirs(run_dirs)
    frames = []
    for label, run_dir in zip(_labels(run_dirs), run_dirs, strict=True):
        frame = RunFolder(run_dir).read_emergence()
        frame.insert(0, "run", label)
        frame.insert(1, "method", method_of(run_dir))
        frame.insert(2, "seed", seed_of(run_dir))
        frame["run_dir"] = str(run_dir)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", "method", "batches"])


def boundary_batches(run: pd.DataFrame) -> float | None:
    """The SFT->RL boundary of one run: the ``boundary`` event's batches, else the last non-RL row before RL.

    None when the run has no RL rows (or starts in RL: RL-zero has no boundary to mark).
    """
    if "event" in run and (run["event"] == "boundary").any():
        return float(run.loc[run["event"] == "boundary", "batches"].iloc[0])
    if "phase" not in run:
        return None
    rl = (run["phase"] == "rl").to_numpy().nonzero()[0]
    if not len(rl) or rl[0] == 0:
        return None
    return float(run["batches"].iloc[rl[0] - 1])


def final_numbers(rows: pd.DataFrame, run_dir: str | Path | None) -> dict:
    """One run's final numbers: the one definition behind :func:`final_points` (the notebook's accuracy-vs-inversion
    points) and :func:`corrpo.runs.comparison.collect_run` (the comparison's per-run table).

    ``rows`` are the run's emergence rows in any order; the last and first by ``batches`` (a stable sort: the
    file's order among ties) give ``batches``, ``spearman``, ``strength = -spearman`` and ``spearman_start``, and
    the last row's ``method`` label (None when the rows carry none). ``end_acc`` is the ``when == "end"`` test
    accuracy of ``run_dir``'s results.json (NaN when absent, or without a folder: wandb rows).
    """
    rows = rows.sort_values("batches", kind="stable")
    first, last = rows.iloc[0], rows.iloc[-1]
    spearman = float(last["spearman"])
    return {
        "method": last["method"] if "method" in last.index else None,
        "batches": int(last["batches"]),
        "spearman_start": float(first["spearman"]),
        "spearman": spearman,
        "strength": -spearman,
        "end_acc": RunFolder(run_dir).test_accuracy("end") if run_dir is not None else math.nan,
    }


def final_points(df: pd.DataFrame, run_dirs: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """One row per run of ``df`` (:func:`final_numbers`): final ``spearman``, ``inversion_strength = -spearman``
    (last row) and end test accuracy (``test_accuracy``).

    ``run_dirs``, when given, keeps only the runs of those folders (rows without a folder, from wandb, are kept);
    by default every run of the frame is a point.
    """
    dirs = {str(d) for d in run_dirs} if run_dirs is not None else None
    rows = []
    for run, group in df.groupby("run", sort=False):
        run_dir = group["run_dir"].iloc[0] if "run_dir" in group else None
        run_dir = run_dir if isinstance(run_dir, str) else None  # wandb rows have no folder
        if dirs is not None and run_dir is not None and run_dir not in dirs:
            continue
        final = final_numbers(group, run_dir)
        rows.append(
            {
                "run": run,
                "method": final["method"],
                "batches": final["batches"],
                "spearman": final["spearman"],
                "inversion_strength": final["strength"],
                "test_accuracy": final["end_acc"],
            }
        )
    return pd.DataFrame(rows, columns=["run", "method", "batches", "spearman", "inversion_strength", "test_accuracy"])


def load_wandb(project: str | None, max_runs: int = 50) -> pd.DataFrame:
    """``inversion/spearman`` histories of a wandb project as emergence rows; empty (with a warning) offline.

    ``batches`` is wandb's ``trainer/global_step`` (else ``_step``); ``phase`` is rebuilt from the logged
    ``phase`` metric (0 = SFT, 1 = RL). ``method`` comes from the run's config or name like :func:`method_of`.
    """
    empty = pd.DataFrame(columns=["run", "method", "batches"])
    if not project or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled"):
        return empty
    try:
        import wandb

        frames = []
        for run in list(wandb.Api(timeout=20).runs(project))[:max_runs]:
            hist = run.history(keys=["inversion/spearman", "inversion/pearson"], pandas=True)
            if hist.empty:
                continue
            step = "trainer/global_step" if "trainer/global_step" in hist else "_step"
            method = run.config.get("method") or method_of(Path(run.name))
            frames.append(
                pd.DataFrame(
                    {
                        "run": f"wandb:{run.name}",
                        "method": method,
                        "batches": hist[step],
                        "spearman": hist["inversion/spearman"],
                        "pearson": hist.get("inversion/pearson"),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True) if frames else empty
    except Exception as error:  # noqa: BLE001 -- no network, no login, no project: skip, never fail the notebook
        warnings.warn(f"wandb project {project!r} skipped: {error}", stacklevel=2)
        return empty


RUN_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "P")]
"""Line style and marker of the 1st, 2nd, ... run of one method (the method sets the colour)."""


def plot_emergence(df: pd.DataFrame):
    """Spearman rho against batches, one line per run: coloured by method, styled apart within a method, each
    labelled by :func:`run_legend` (method, run, seed) in a legend outside the axes; each run's SFT->RL boundary
    a thin vertical line of its colour."""
    fig, ax = plt.subplots(figsize=(8.5, 4))  # wider than the axes: the legend sits to their right
    colours = {m: f"C{i}" for i, m in enumerate(sorted(df["method"].astype(str).unique()))}
    seen: dict[str, int] = {}
    for run, group in df.groupby("run", sort=False):
        group = group.sort_values("batches", kind="stable")
        method = str(group["method"].iloc[0])
        style, marker = RUN_STYLES[seen.get(method, 0) % len(RUN_STYLES)]
        seen[method] = seen.get(method, 0) + 1
        seed = group["seed"].iloc[0] if "seed" in group else None
        ax.plot(group["batches"], group["spearman"], marker=marker, ms=3, color=colours[method], linestyle=style,
                label=run_legend(str(run), method, seed), alpha=0.85)  # fmt: skip
        boundary = boundary_batches(group)
        if boundary is not None:
            ax.axvline(boundary, color=colours[method], linestyle=(0, (2, 4)), linewidth=0.8, alpha=0.6)
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("training step (batches); thin vertical: SFT -> RL")
    ax.set_ylabel("Spearman rho (entropy vs gradient strength)")
    ax.set_title("Emergence of the entropy-gradient inversion (rho < 0)")
    if seen:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="method: run (seed)")
    fig.tight_layout()
    return fig


def plot_accuracy_vs_inversion(points: pd.DataFrame):
    """Final test accuracy against final inversion strength (-rho), one point per run, coloured by method."""
    fig, ax = plt.subplots(figsize=(5, 4))
    n = 0
    for i, (method, group) in enumerate(points.groupby("method", sort=True)):
        ax.scatter(group["inversion_strength"], group["test_accuracy"], color=f"C{i}", label=str(method))
        for _, row in group.iterrows():  # names shortened, staggered so that nearby points' names do not overlap
            ax.annotate(short_label(str(row["run"]), 24), (row["inversion_strength"], row["test_accuracy"]),
                        fontsize=6, alpha=0.7, color=f"C{i}", xytext=(4, 4 - 8 * (n % 4)),
                        textcoords="offset points")  # fmt: skip
            n += 1
    ax.set_xlabel("final inversion strength (-Spearman rho)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("Accuracy vs inversion across runs")
    if len(points):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="method")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    return fig
