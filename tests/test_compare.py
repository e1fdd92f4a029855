"""corrpo.runs.comparison (collecting, statistics, the report) and benchmarks/compare.py's driver, on fake run folders
(no training)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from corrpo.runs import analysis, comparison
from corrpo.runs.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_benchmark", REPO / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, name: str, start: float, end: float, rhos: list[float], tags: dict | None = None) -> Path:
    """A run folder like the CLI's: results.json (start/end accuracy) and emergence.csv (one row per rho)."""
    run_dir = root / name / "20260101-000000"
    run_dir.mkdir(parents=True)
    steps = [20 * i for i in range(len(rhos))]
    results = {
        "test_accuracy": [
            {"when": "start", "step": 0, "accuracy": start},
            {"when": "end", "step": steps[-1], "accuracy": end},
        ],
        "skipped_updates": 0,
    }
    results.update(tags or {})
    (run_dir / "results.json").write_text(json.dumps(results))
    lines = ["step,batches,phase,event,source,spearman,pearson,strength,n_tokens"]
    for i, (step, rho) in enumerate(zip(steps, rhos, strict=True)):
        phase, event = ("init", "start") if i == 0 else ("rl", "end" if i == len(rhos) - 1 else "periodic")
        lines.append(f"{step},{step},{phase},{event},reference,{rho},{rho},{-rho},100")
    (run_dir / "emergence.csv").write_text("\n".join(lines) + "\n")
    return run_dir


def fake_runs(compare, tmp_path: Path) -> list[dict]:
    runs = []
    for seed, (g_acc, c_acc, g_rho, c_rho) in enumerate([(0.70, 0.71, 0.70, 0.68), (0.64, 0.69, 0.72, 0.70)]):
        g = fake_run(tmp_path, f"grpo/seed{seed}", 0.65, g_acc, [0.74, 0.72, g_rho], {"method": "grpo"})
        c = fake_run(tmp_path, f"corrpo/seed{seed}", 0.65, c_acc, [0.74, 0.71, c_rho])
        runs.append(comparison.collect_run(g, 10.0, method="grpo", coef=0.0, seed=seed))
        runs.append(comparison.collect_run(c, 12.0, method="corrpo", coef=0.1, seed=seed))
    return runs


def test_collect_run_reads_accuracy_and_last_emergence_row(compare, tmp_path):
    run_dir = fake_run(tmp_path, "corrpo/seed3", 0.6, 0.7, [0.5, 0.2, -0.1], {"method": "corrpo", "seed": 3})
    run = comparison.collect_run(run_dir, 5.0, method="grpo", coef=0.1, seed=9)
    assert run["method"] == "corrpo" and run["seed"] == 3  # results.json wins over the defaults
    assert run["coef"] == 0.1
    assert run["start_acc"] == pytest.approx(0.6) and run["end_acc"] == pytest.approx(0.7)
    assert run["spearman"] == pytest.approx(-0.1) and run["strength"] == pytest.approx(0.1)
    assert run["spearman_start"] == pytest.approx(0.5)
    assert run["rl_steps"] == 40 and run["wall_s"] == 5.0


def test_collect_run_and_the_notebooks_final_points_share_one_definition(tmp_path):
    run_dir = fake_run(tmp_path, "corrpo/seed0", 0.6, 0.7, [0.5, 0.2, -0.1])
    run = comparison.collect_run(run_dir)
    (point,) = analysis.final_points(analysis.load_emergence([run_dir])).to_dict("records")
    final = analysis.final_numbers(RunFolder(run_dir).read_emergence(), run_dir)
    assert (point["spearman"], point["inversion_strength"], point["test_accuracy"]) == (
        run["spearman"],
        run["strength"],
        run["end_acc"],
    )
    assert (final["spearman"], final["strength"], final["end_acc"], final["batches"]) == (-0.1, 0.1, 0.7, 40)
    assert final["spearman_start"] == run["spearman_start"] == 0.5 and final["method"] is None


def test_find_run_dir_and_tag_results(compare, tmp_path):
    old = fake_run(tmp_path / "a", "x", 0.1, 0.2, [0.1, 0.2])
    assert compare.find_run_dir(tmp_path / "a" / "x") == old
    assert compare.find_run_dir(tmp_path / "a" / "x", exclude={old}) is None
    assert compare.find_run_dir(tmp_path / "missing") is None
    compare.tag_results(old, method="corrpo", coef=0.1, seed=2)
    results = json.loads((old / "results.json").read_text())
    assert results["method"] == "corrpo" and results["seed"] == 2 and "test_accuracy" in results

    from corrpo.runs.analysis import method_of

    assert method_of(old) == "corrpo"


def test_summarize_and_paired_differences(compare, tmp_path):
    runs = fake_runs(compare, tmp_path)
    summary = comparison.summarize(runs)
    assert list(summary) == ["grpo", "corrpo"]
    assert summary["grpo"]["n"] == 2
    mean, std = summary["corrpo"]["end_acc"]
    assert mean == pytest.approx(0.70) and std == pytest.approx(math.sqrt(2) * 0.01)
    assert summary["grpo"]["strength"][0] == pytest.approx(-0.71)
    assert summary["corrpo"]["rho_change"][0] == pytest.approx(0.69 - 0.74)
    assert comparison.paired_differences(runs, "end_acc") == pytest.approx([0.01, 0.05])
    assert comparison.mean_std([1.0]) == (1.0, comparison.mean_std([1.0])[1]) and math.isnan(
        comparison.mean_std([1.0])[1]
    )
    line = comparison.result_line(summary)
    assert line.startswith("RESULT grpo_acc=0.6700 corrpo_acc=0.7000 grpo_strength=-0.7100 corrpo_strength=")


def test_interpret_is_computed_from_numbers(compare, tmp_path):
    runs = fake_runs(compare, tmp_path)
    shows, not_shown = comparison.interpret(runs, comparison.summarize(runs), n_test=200)
    text = " ".join(shows)
    assert "+0.030" in text  # paired accuracy difference
    assert "not evidence" in text  # 0.03 with per-seed 0.01, 0.05: SE 0.02, not > 2 SE
    assert "positive in all 4 runs" in text
    assert "200 test problems" in text
    assert any("2 seed(s)" in s for s in not_shown)
    # a single seed: no spread, no claim
    one = [r for r in runs if r["seed"] == 0]
    shows, _ = comparison.interpret(one, comparison.summarize(one), n_test=None)
    assert "single seed" in " ".join(shows)


def test_write_comparison_report_writes_markdown_and_plots(compare, tmp_path):
    runs = fake_runs(compare, tmp_path)
    report = tmp_path / "docs" / "results.md"
    summary = comparison.write_comparison_report(
        report, runs, {"seeds": "0 1", "RL steps": 40}, "python benchmarks/compare.py --seeds 0 1", n_test=200
    )
    assert set(summary) == {"grpo", "corrpo"}
    text = report.read_text()
    for piece in (
        "python benchmarks/compare.py --seeds 0 1",
        "## Per run",
        "## Per method (mean ± std over seeds)",
        "![emergence curves](results_emergence.png)",
        "![accuracy vs inversion strength](results_accuracy.png)",
        "## What this shows",
        "## What this does not show",
        "0.700 ± 0.014",
    ):
        assert piece in text
    assert (tmp_path / "docs" / "results_emergence.png").stat().st_size > 0
    assert (tmp_path / "docs" / "results_accuracy.png").stat().st_size > 0


def test_collect_only_main_on_fake_tree(compare, tmp_path, capsys):
    out = tmp_path / "runs"
    fake_run(out, "sft", 0.0, 0.65, [0.2, 0.7])
    for seed in (0, 1):
        fake_run(out, f"grpo/seed{seed}", 0.65, 0.68 + 0.01 * seed, [0.74, 0.7], {"method": "grpo", "seed": seed})
        fake_run(out, f"corrpo/seed{seed}", 0.65, 0.69, [0.74, 0.69], {"method": "corrpo", "seed": seed})
    args = ["--out", str(out), "--seeds", "0", "1", "--collect-only"]
    summary = compare.main(args)
    report = out / "results.md"  # the default: under the run root, never the committed docs/results.md
    assert summary["grpo"]["n"] == 2 and summary["corrpo"]["n"] == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "RESULT grpo_acc=0.6850 corrpo_acc=0.6900 grpo_strength=-0.7000 corrpo_strength=-0.6900"
    assert (out / "results_emergence.png").is_file() and "--collect-only" in report.read_text()


def test_three_methods_reuse_and_the_80_20_baseline_compared_with_grpo(compare, tmp_path, capsys):
    out = tmp_path / "runs"
    fake_run(out, "sft", 0.0, 0.65, [0.2, 0.7])
    for seed in (0, 1):
        fake_run(out, f"grpo/seed{seed}", 0.65, 0.68, [0.74, 0.7], {"method": "grpo", "seed": seed, "wall_s": 9.0})
        fake_run(out, f"corrpo/seed{seed}", 0.65, 0.69, [0.74, 0.69], {"method": "corrpo", "seed": seed})
        top = {"method": "top_entropy", "seed": seed, "top_entropy_quantile": 0.2}
        fake_run(out, f"top_entropy/seed{seed}", 0.65, 0.60 + 0.02 * seed, [0.74, 0.6], top)
    report = tmp_path / "r.md"
    # every method/seed has a finished run, so --reuse trains nothing (a training run would fail here)
    summary = compare.main(["--out", str(out), "--report", str(report), "--seeds", "0", "1", "--reuse"])
    assert list(summary) == ["grpo", "corrpo", "top_entropy"] and summary["grpo"]["wall_s"][0] == 9.0
    text = report.read_text()
    assert text.startswith("# GRPO vs CorR-PO vs 80/20 (top-entropy tokens) on the tiny arithmetic task")
    assert "80/20 (top-entropy tokens) minus GRPO end test accuracy, paired by seed: -0.070" in text
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("top_entropy_acc=0.6100 top_entropy_strength=-0.6000")
    with pytest.raises(SystemExit):
        compare.parse_args(["--methods", "corrpo", "top_entropy"])


def test_wall_from_log_reads_the_log_named_after_the_runs_start(compare, tmp_path):
    import os
    import time

    run_dir = tmp_path / "grpo" / "seed0" / "20261127-082332"
    run_dir.mkdir(parents=True)
    assert math.isnan(compare.wall_from_log(run_dir))
    for name, seconds in (("fit-20261127-080000.log", 50), ("fit-20261127-082322.log", 140)):
        log = run_dir.parent / name
        log.write_text("...")
        start = time.mktime(time.strptime(name[4:-4], "%Y%m%d-%H%M%S"))
        os.utime(log, (start + seconds, start + seconds))
    (run_dir.parent / "fit-20261127-090000.log").write_text("a later run's log")
    assert compare.wall_from_log(run_dir) == 140.0


def test_grpo_runs_as_the_control_and_corrpo_with_its_apply_mode(compare, tmp_path, monkeypatch):
    """The driver's RL commands: GRPO logs CorR-PO's statistic untouched (``log_only``) unless ``--no-control``,
    CorR-PO enters its term where ``--apply`` says; the fits themselves are stood in for by finished fake runs."""
    out = tmp_path / "runs"
    fake_run(out, "sft", 0.0, 0.65, [0.2, 0.7])
    commands: dict[str, list[str]] = {}

    def fake_fit(config, extra, root):
        method = root.parent.name
        commands[method] = extra
        return fake_run(root.parent, root.name + "-run", 0.65, 0.7, [0.7, 0.6], {"method": method}), 1.0

    monkeypatch.setattr(compare, "run_fit", fake_fit)
    sft_policy = str(out / "sft" / "20260101-000000" / "policy")
    args = ["--out", str(out), "--report", str(tmp_path / "r.md"), "--seeds", "0", "--sft-policy", sft_policy]
    compare.main([*args, "--methods", "grpo", "corrpo", "--apply", "advantage"])
    grpo, corrpo = (" ".join(commands[m]) for m in ("grpo", "corrpo"))
    assert "--model.rl.inversion.log_only true" in grpo and "--model.rl.inversion.coef 0.0" in grpo
    assert "--model.rl.inversion.apply advantage" in corrpo and "log_only" not in corrpo
    commands.clear()
    compare.main([*args, "--methods", "grpo", "--no-control", "--out", str(tmp_path / "again")])
    assert "log_only" not in " ".join(commands["grpo"])
