"""The training curves of one run, as data: the RL reward and its parts, accuracy, completion length.

Why: ``corrpo report`` draws these beside ``emergence.png`` (``reward.png``, ``accuracy.png``,
``completion_length.png``). Each figure is a :class:`CurveSet` built here from what the run folder holds (the
logged scalars: wandb history rows or a CSVLogger ``metrics.csv``, one dict per row with
``trainer/global_step``; results.json's ``test_accuracy`` and ``eval``) and drawn by
:func:`corrpo.runs.plotting.curves_figure`, so a test compares the drawn lines with the metrics, not pixels. A
figure with nothing to show carries the reason instead (``missing``), which the report prints in its place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

STEP_KEY = "trainer/global_step"
"""The x of every logged scalar: the optimizer step Lightning logs it at (wandb's ``trainer/global_step``)."""

REWARD_KEYS = ("rl/reward", "reward")
"""The RL reward: ``rl/reward`` (TRL's name in the ``rl/`` section), ``reward`` in older runs."""

REWARD_PART = re.compile(r"^(?:rl/)?rewards/(?P<name>.+)/mean$")
"""One reward function's mean over the step's completions (``rl/rewards/<name>/mean``, unweighted)."""

LENGTH_KEYS = ("rl/completions/mean_length", "rl/completions/clipped_ratio")
"""Completion length in tokens, and the fraction of completions cut at ``rl.sampling.max_new_tokens``."""

EVAL_KEYS = ("greedy_accuracy", "pass@", "mean@")
"""The accuracies of a results.json ``eval`` entry (``pass@k`` / ``mean@k`` for any k)."""


Points = list[tuple[int, float]]


@dataclass(frozen=True)
class Series:
    """One line: ``label`` and its ``(step, value)`` points; ``right`` puts it on a second y-axis, ``main`` draws
    it bold (the figure's headline quantity)."""

    label: str
    points: Points
    right: bool = False
    main: bool = False


@dataclass(frozen=True)
class CurveSet:
    """One figure: its file stem (``name`` -> ``<name>.png``), title, y-axis labels, ranges (None: matplotlib's)
    and lines; or, with nothing to draw, ``missing``: why (the report's line in the figure's place)."""

    name: str
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    right_label: str | None = None
    missing: str | None = None
    ylim: tuple[float, float] | None = None
    right_ylim: tuple[float, float] | None = None


FRACTION = (-0.03, 1.03)
"""The y range of a fraction (accuracy, clipped ratio): 0 to 1 with a margin, so that runs compare by eye."""


def logged_series(history: Iterable[dict], key: str) -> Points:
    """``(trainer/global_step, value)`` of every row that logged ``key`` as a finite number, sorted by step; a step
    logged twice (a resumed run repeats the steps after its checkpoint) keeps its later value."""
    by_step: dict[int, float] = {}
    for row in history:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        by_step[int(row.get(STEP_KEY, row.get("_step", -1)))] = float(value)
    return sorted(by_step.items())


def _keys(history: list[dict]) -> list[str]:
    """Every key of the rows, in first-logged order."""
    return list(dict.fromkeys(key for row in history for key in row))


def reward_curves(history: list[dict], no_rl: str) -> CurveSet:
    """The RL reward (weighted sum, bold) and each reward function's unweighted mean, per logged RL step."""
    curves = CurveSet("reward", "RL reward per step (mean over the step's completions)", "reward")
    total = next((points for key in REWARD_KEYS if (points := logged_series(history, key))), [])
    if not total:
        return CurveSet(curves.name, curves.title, curves.ylabel, missing=no_rl)
    series = [Series("reward (weighted sum)", total, main=True)]
    for key in _keys(history):
        match = REWARD_PART.match(key)
        if match and (points := logged_series(history, key)):
            series.append(Series(f"rewards/{match['name']}/mean", points))
    return CurveSet(curves.name, curves.title, curves.ylabel, series)


def accuracy_curves(results: dict | None, history: list[dict]) -> CurveSet:
    """Test accuracy at every evaluation point (bold), each ``model.eval`` set's greedy / pass@k / mean@k, and
    the accuracy rewards on the RL batches (sampled, so below greedy test accuracy early on).

    The evaluations come from results.json; a run without one (interrupted) falls back on the logged
    ``eval/*`` scalars.
    """
    name, title, ylabel = "accuracy", "Accuracy: evaluations (points) and RL samples", "accuracy"
    series = []
    tests = [e for e in (results or {}).get("test_accuracy", []) if isinstance(e.get("accuracy"), int | float)]
    if tests:
        series.append(Series("test (greedy)", sorted((int(e["step"]), float(e["accuracy"])) for e in tests), main=True))
        by_line: dict[str, Points] = {}
        for entry in (results or {}).get("eval", []):
            for key, value in entry.items():
                if key.startswith(EVAL_KEYS) and isinstance(value, int | float) and math.isfinite(value):
                    if (entry.get("split"), key) != ("test", "greedy_accuracy"):  # the test line already
                        label = f"{entry.get('split')} {'greedy' if key == 'greedy_accuracy' else key}"
                        by_line.setdefault(label, []).append((int(entry["step"]), float(value)))
        series += [Series(label, sorted(points)) for label, points in by_line.items()]
    else:
        for key in _keys(history):
            if key.startswith("eval/") and (points := logged_series(history, key)):
                label = "test (greedy)" if key == "eval/test_accuracy" else key
                series.append(Series(label, points, main=key == "eval/test_accuracy"))
    if not series:
        why = "no evaluation was recorded (no results.json `test_accuracy`, no logged `eval/` metric)"
        return CurveSet(name, title, ylabel, missing=why)
    for key in _keys(history):
        match = REWARD_PART.match(key)
        if match and "accuracy" in match["name"] and (points := logged_series(history, key)):
            series.append(Series(f"RL samples: rewards/{match['name']}/mean", points))
    return CurveSet(name, title, ylabel, series, ylim=FRACTION)


def length_curves(history: list[dict], no_rl: str) -> CurveSet:
    """Mean completion length in tokens per RL step and, on the right axis, the fraction cut at
    ``rl.sampling.max_new_tokens`` (a rising fraction: the length limit, not the policy, sets the length)."""
    name, title = "completion_length", "RL completion length per step"
    length, clipped = (logged_series(history, key) for key in LENGTH_KEYS)
    if not length:
        rl_logged = any(logged_series(history, key) for key in REWARD_KEYS)
        return CurveSet(name, title, "tokens", missing=f"no `{LENGTH_KEYS[0]}` was logged" if rl_logged else no_rl)
    series = [Series("mean length (tokens)", length, main=True)]
    series += [Series("clipped ratio (hit max_new_tokens)", clipped, right=True)] if clipped else []
    right = {"right_label": "fraction clipped", "right_ylim": FRACTION} if clipped else {}
    return CurveSet(name, title, "tokens", series, **right)


def training_curves(history: list[dict], results: dict | None, no_rl: str) -> list[CurveSet]:
    """The report's three figures, in order: reward, accuracy, completion length. ``no_rl`` is the reason shown
    where the RL curves are missing (SFT only, nothing logged, ...)."""
    return [reward_curves(history, no_rl), accuracy_curves(results, history), length_curves(history, no_rl)]
