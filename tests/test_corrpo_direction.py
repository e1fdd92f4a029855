"""benchmarks/corrpo_direction.py's statistics and report, on fake runs with known answers (no training)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "corrpo_direction.py"


@pytest.fixture(scope="module")
def direction():
    spec = importlib.util.spec_from_file_location("corrpo_direction", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake(statistic: list[float], probe_rho: float, factor: float, accuracy: float = 0.5) -> dict:
    steps = range(1, len(statistic) + 1)
    probe = pd.DataFrame({"batches": [0, len(statistic)], "spearman": [0.0, probe_rho], "anatomy_sin": [0.0, factor]})
    return {
        "series": {"statistic": dict(zip(steps, statistic, strict=True)), "zero_std": {1: 0.5}, "accuracy": {}},
        "probe": probe,
        "end_acc": accuracy,
        "start_acc": 0.0,
    }


def test_the_interval_is_students_t_and_the_late_mean_is_the_second_half(direction):
    mean, half = direction.mean_ci([1.0, 2.0, 4.0])
    sem = stats.sem([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and half == pytest.approx(stats.t.ppf(0.975, 2) * sem)
    assert math.isnan(direction.mean_ci([1.0])[1])
    assert direction.late_mean({1: 9.0, 2: 9.0, 3: 1.0, 4: 3.0}) == pytest.approx(2.0)
    assert direction.verdict((-0.3, 0.1)) == "lower" and direction.verdict((0.3, 0.1)) == "higher"
    assert direction.verdict((0.05, 0.1)) == "unresolved"


def test_the_control_runs_first_with_log_only_then_every_mode_and_lambda(direction):
    names = [name for name, _ in direction.arms([0.1, 0.5], ["reward", "advantage"])]
    assert names == ["control", "reward-0.1", "reward-0.5", "advantage-0.1", "advantage-0.5"]
    assert "--model.rl.inversion.log_only" in direction.arms([0.1], ["reward"])[0][1]


def test_the_report_answers_from_the_numbers(direction, tmp_path):
    # reward-0.5 lowers the rewarded statistic in every seed by about 0.4, its probe rho does not follow (it rises)
    # and the anatomy factor `sin` moves instead; advantage-0.5 matches the control
    results = {
        "control": {s: fake([0.1, 0.1, 0.2 + 0.01 * s, 0.2], -0.1 - 0.01 * s, 0.0) for s in range(3)},
        "reward-0.5": {s: fake([0.0, -0.1, -0.2 + 0.01 * s, -0.2], 0.2 + 0.01 * s, 0.3 + 0.02 * s) for s in range(3)},
        "advantage-0.5": {s: fake([0.1, 0.1, 0.2 + 0.01 * s, 0.2], -0.1 - 0.01 * s, 0.0) for s in range(3)},
    }
    context = {
        "config": "c.yaml",
        "command": "python x",
        "sft": "sft",
        "sft_rho": -0.1,
        "rl_steps": 4,
        "seeds": "0 1 2",
    }
    path = tmp_path / "results.md"
    counts = direction.report(results, context, path)
    assert counts == {"lowered": 1, "raised": 0, "probe_lowered": 0, "probe_raised": 1}
    text = path.read_text()
    assert "- **reward-0.5**: the rewarded statistic is lower than the control's (-0.400" in text
    assert "the probe rho is higher than the control's" in text and "`sin` (+0.320" in text
    assert "- **advantage-0.5**: the rewarded statistic is not resolved from the control's" in text
    assert "- **Does the effect grow with lambda (reward)?** The mean difference from the control: lambda 0.5: " in text
    assert "one lambda, no trend to read." in text
    assert (tmp_path / "results_steps.png").is_file()
