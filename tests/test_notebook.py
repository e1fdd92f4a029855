"""notebooks/emergence.ipynb runs headless on a real tiny run; corrpo.runs.analysis on synthetic run folders."""

import csv
import json
import math
import os
import sys
from pathlib import Path

import nbformat
import pytest

from corrpo.runs import analysis

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["step", "batches", "phase", "event", "source", "spearman", "pearson", "strength", "n_tokens"]


def _kernel_name() -> str:
    """``python3`` when this interpreter can serve it (ipykernel importable), installing the spec if missing.

    jupyter_client runs the native ``python3`` spec with ``sys.executable``, so the kernel is this venv's
    python whatever the user's other kernels are.
    """
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(prefix=sys.prefix)
    return "python3"


@pytest.mark.parametrize("kernel_dir", ["outside the checkout", "notebooks"])
def test_notebook_runs_on_a_tiny_run(kernel_dir, tiny_run, tmp_path, monkeypatch):
    """``CORRPO_RUNS`` given relative to the repository root, as the README documents, whether the kernel
    starts (as Jupyter starts it) in notebooks/ or in a folder outside the checkout (the root is found from the
    installed corrpo; the root itself: test_repo_root_is_found_from_any_working_directory); the figures show
    inline in the cells."""
    from nbclient import NotebookClient

    figures = tmp_path / "figures"
    monkeypatch.setenv("CORRPO_RUNS", os.path.relpath(tiny_run.parent, REPO))  # the parent: a folder of runs
    monkeypatch.setenv("CORRPO_FIGURES", str(figures))
    monkeypatch.delenv("CORRPO_WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(REPO / "notebooks" / "emergence.ipynb", as_version=4)
    cwd = tmp_path if kernel_dir == "outside the checkout" else REPO / "notebooks"
    NotebookClient(nb, kernel_name=_kernel_name(), timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()
    assert "1 run folder(s)" in "".join(o.get("text", "") for o in nb.cells[1].outputs)
    images = [c for c in nb.cells if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert len(images) == 3  # the emergence curve, the anatomy (the tiny run has its columns), accuracy vs inversion
    assert "matplotlib.use" not in "".join(c.source for c in nb.cells)
    for cell in nb.cells:
        assert not any(o.get("output_type") == "error" for o in cell.get("outputs", []))
    # the last cell shows the final points: the tiny run must be in it (not an empty frame plotted)
    shown = "".join(o.get("data", {}).get("text/plain", "") for o in nb.cells[-1].outputs)
    run_dir = analysis.expand_run_dirs([tiny_run])[0]
    run_name = f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name[0].isdigit() else run_dir.name
    assert run_name in shown and "inversion_strength" in shown, shown
    for name in ("emergence.png", "anatomy.png", "accuracy_vs_inversion.png"):
        data = (figures / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name


def _write_run(folder: Path, rows: list[tuple], results: dict | None) -> Path:
    folder.mkdir(parents=True)
    with (folder / "emergence.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for batches, phase, event, rho in rows:
            writer.writerow([batches, batches, phase, event, "reference", rho, rho / 2, -rho, 100])
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_analysis_on_two_synthetic_runs(tmp_path, monkeypatch):
    a = _write_run(
        tmp_path / "corrpo_lam0.1",
        [
            (0, "init", "start", 0.05),
            (10, "sft", "boundary", -0.3),
            (15, "rl", "periodic", -0.5),
            (20, "rl", "end", -0.6),
        ],
        {
            "test_accuracy": [
                {"when": "start", "step": 0, "accuracy": 0.0},
                {"when": "end", "step": 20, "accuracy": 0.7},
            ]
        },
    )
    b = _write_run(
        tmp_path / "baseline",
        [(0, "init", "start", 0.1), (4, "sft", "periodic", -0.1), (8, "rl", "periodic", -0.2)],
        {"method": "grpo", "test_accuracy": [{"when": "end", "step": 8, "accuracy": 0.5}]},
    )
    c = _write_run(tmp_path / "x", [(0, "init", "start", 0.0), (5, "sft", "end", -0.1)], None)

    monkeypatch.setenv("CORRPO_RUNS", os.pathsep.join(map(str, [a, b, c])))
    assert analysis.run_dirs_from_env(tmp_path / "nowhere") == [a, b, c]
    monkeypatch.delenv("CORRPO_RUNS")
    assert analysis.run_dirs_from_env(tmp_path) == sorted([a, b, c])
    monkeypatch.setenv("CORRPO_RUNS", str(tmp_path))  # a parent folder expands to its runs
    assert analysis.run_dirs_from_env() == sorted([a, b, c])
    assert analysis.run_dirs_from_env(tmp_path / "nowhere", env="UNSET_CORRPO_VAR") == []

    df = analysis.load_emergence([a, b, c])
    assert len(df) == 9 and {"run", "method", "batches", "spearman", "run_dir"} <= set(df.columns)
    assert df.groupby("run")["method"].first().to_dict() == {"corrpo_lam0.1": "corrpo", "baseline": "grpo", "x": "run"}
    by_run = {run: group for run, group in df.groupby("run")}
    assert analysis.boundary_batches(by_run["corrpo_lam0.1"]) == 10  # the boundary event
    assert analysis.boundary_batches(by_run["baseline"]) == 4  # last SFT row before the first RL row
    assert analysis.boundary_batches(by_run["x"]) is None  # no RL

    points = analysis.final_points(df, [a, b, c]).set_index("run")
    assert points.loc["corrpo_lam0.1", "inversion_strength"] == pytest.approx(0.6)
    assert points.loc["corrpo_lam0.1", "test_accuracy"] == pytest.approx(0.7)
    assert points.loc["baseline", "inversion_strength"] == pytest.approx(0.2)
    assert points.loc["baseline", "test_accuracy"] == pytest.approx(0.5)
    assert math.isnan(points.loc["x", "test_accuracy"])
    assert list(analysis.final_points(df, [a]).run) == ["corrpo_lam0.1"]

    for fig, name in (
        (analysis.plot_emergence(df), "e.png"),
        (analysis.plot_accuracy_vs_inversion(points.reset_index()), "a.png"),
    ):
        fig.savefig(tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)


def test_wandb_is_skipped_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert analysis.load_wandb("someone/corrpo").empty
    assert analysis.load_wandb(None).empty


def test_the_notebook_saves_figures_in_a_git_ignored_folder():
    import subprocess

    source = "".join(c.source for c in nbformat.read(REPO / "notebooks" / "emergence.ipynb", as_version=4).cells)
    assert '"runs/figures"' in source and "notebooks/figures" not in source
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/figures/x.png"], cwd=REPO, check=False)
    assert ignored.returncode == 0


def test_repo_root_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(analysis.REPO_ENV, raising=False)
    assert analysis.repo_root(REPO) == REPO and analysis.repo_root(REPO / "notebooks") == REPO
    assert analysis.repo_root(tmp_path) == REPO  # outside any checkout: the one corrpo is imported from
    monkeypatch.chdir(tmp_path)
    assert analysis.repo_root() == REPO
    monkeypatch.setenv(analysis.REPO_ENV, str(tmp_path))  # named explicitly: taken as is
    assert analysis.repo_root(REPO) == tmp_path


def test_runs_of_one_method_are_told_apart_by_folder_and_seed(tmp_path):
    """Two GRPO seeds in same-named timestamp folders: distinct legend entries naming folder and seed, distinct
    line styles, the legend outside the axes; a long label is shortened in the middle."""
    rows = [(0, "init", "start", 0.1), (4, "sft", "boundary", 0.2), (8, "rl", "end", 0.3)]
    runs = [
        _write_run(tmp_path / "grpo" / f"arm{seed}" / "20260101-000000", rows,
                   {"method": "grpo", "seeds": {"seed_everything": seed, "model": seed, "data": seed}})
        for seed in (0, 1)
    ]  # fmt: skip
    config_only = _write_run(tmp_path / "other" / "20260101-000000", rows, None)
    (config_only / "config.yaml").write_text("seed_everything: 7\n")
    assert [analysis.seed_of(r) for r in [*runs, config_only]] == [0, 1, 7]

    fig = analysis.plot_emergence(analysis.load_emergence(runs))
    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["grpo: arm0/20260101-000000 (seed 0)", "grpo: arm1/20260101-000000 (seed 1)"]
    styles = {(line.get_linestyle(), line.get_marker()) for line in ax.lines if line.get_label() in texts}
    assert len(styles) == 2
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # outside: hides no line

    name = "runs/compare/corrpo_lam0.05/seed12/20261127-082332"
    short = analysis.short_label(name)
    assert len(short) == 32 and short.startswith("runs/c") and short.endswith("seed12/20261127-082332")
    assert analysis.short_label("tiny/20261127-082332") == "tiny/20261127-082332"
