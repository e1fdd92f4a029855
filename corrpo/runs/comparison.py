"""Comparing methods across seeds: per-run numbers from run folders, statistics and the markdown report.

Library half of ``benchmarks/compare.py`` (which only runs the fits): :func:`collect_run` reads one finished run
through :class:`corrpo.runs.run_folder.RunFolder` (its final numbers are :func:`corrpo.runs.analysis.final_numbers`,
the notebook's too); :func:`summarize`, :func:`paired_differences` and :func:`interpret` compute the statistics and
the sentences the report states (every statement is derived from the numbers: a difference within about two
standard errors is called noise); :func:`write_comparison_report` writes the markdown report with its tables and
plots; :func:`result_line` is the benchmark's ``RESULT`` line.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import matplotlib.pyplot as plt  # the backend is the caller's, as in corrpo.runs.analysis

from corrpo.runs.analysis import (
    final_numbers,
    final_points,
    load_emergence,
    plot_accuracy_vs_inversion,
    plot_emergence,
)
from corrpo.runs.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("grpo", "corrpo", "top_entropy")
LABELS = {"grpo": "GRPO", "corrpo": "CorR-PO", "top_entropy": "80/20 (top-entropy tokens)"}


# --------------------------------------------------------------------------------------- collecting
def collect_run(run_dir: Path, wall_s: float = math.nan, **defaults) -> dict:
    """One run's numbers: method/coef/seed (results.json, else ``defaults``), start and end test accuracy, the
    last ``emergence.csv`` row's Spearman rho and strength (-rho), the first row's rho
    (:func:`corrpo.runs.analysis.final_numbers`), RL steps and wall time.
    """
    run = RunFolder(run_dir)
    results = run.read_results()
    final = final_numbers(run.read_emergence(), run.path)
    ends = [r for r in results.get("test_accuracy", []) if r.get("when") == "end"]
    return {
        "method": results.get("method", defaults.get("method", "run")),
        "seed": results.get("seed", defaults.get("seed")),
        "coef": results.get("coef", defaults.get("coef", math.nan)),
        "start_acc": run.test_accuracy("start"),
        "end_acc": final["end_acc"],
        "spearman_start": final["spearman_start"],
        "spearman": final["spearman"],
        "strength": final["strength"],
        "rl_steps": int(ends[-1]["step"]) if ends else final["batches"],
        "wall_s": float(results.get("wall_s", math.nan)) if math.isnan(wall_s) else float(wall_s),
        "run_dir": str(run.path),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample std) ignoring NaN; std is NaN below two values."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method: ``n`` and (mean, std) of start/end accuracy, final rho, strength, rho change and wall time."""
    out = {}
    present = {r["method"] for r in runs}
    for method in [m for m in METHODS if m in present] + sorted(present - set(METHODS)):
        group = [r for r in runs if r["method"] == method]
        out[method] = {"n": len(group), "coef": group[0]["coef"]}
        for key in ("start_acc", "end_acc", "spearman", "strength", "wall_s"):
            out[method][key] = mean_std([r[key] for r in group])
        out[method]["rho_change"] = mean_std([r["spearman"] - r["spearman_start"] for r in group])
    return out


def paired_differences(runs: list[dict], key: str, a: str = "corrpo", b: str = "grpo") -> list[float]:
    """``key`` of method ``a`` minus method ``b``, per seed present in both (same SFT policy, same seed)."""
    by = {(r["method"], r["seed"]): r[key] for r in runs}
    seeds = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b}, key=str)
    return [by[(a, s)] - by[(b, s)] for s in seeds]


def fmt_number(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_mean_std(pair: tuple[float, float], digits: int = 3) -> str:
    mean, std = pair
    return fmt_number(mean, digits) if math.isnan(std) else f"{fmt_number(mean, digits)} ± {fmt_number(std, digits)}"


def _difference_sentence(
    name: str, diffs: list[float], digits: int = 3, label: str = "CorR-PO minus GRPO"
) -> tuple[str, bool | None]:
    """A sentence on the paired difference and whether it exceeds two standard errors (None: cannot tell)."""
    if not diffs:
        return f"No seed has both methods of {label}, so no paired {name} difference can be computed.", None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return (
            f"{label} {name}: {fmt_number(mean, digits)} from a single seed; with one seed there is no "
            "estimate of the seed-to-seed spread, so this is not evidence either way.",
            None,
        )
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    t95 = _t95(len(diffs) - 1)
    significant = abs(mean) > 2 * se if se > 0 else abs(mean) > 0
    if not significant:
        verdict = "within two standard errors, so not evidence of a difference"
    elif not math.isnan(t95) and (se == 0 or abs(mean) <= t95 * se):
        verdict = (
            f"beyond two standard errors but not beyond the {t95:.2f} standard errors a 95% t-interval needs with "
            f"{len(diffs)} seeds, so suggestive at most"
        )
    else:
        verdict = "beyond the 95% t-interval, i.e. consistent across these seeds"
    per_seed = ", ".join(f"{d:+.{digits}f}" for d in diffs)
    return (
        f"{label} {name}, paired by seed: {mean:+.{digits}f} (per seed {per_seed}; standard error "
        f"{se:.{digits}f} over {len(diffs)} seeds): {verdict}.",
        significant,
    )


def _t95(df: int) -> float:
    """Two-sided 95% Student-t critical value (NaN without scipy)."""
    try:
        from scipy.stats import t
    except ImportError:
        return math.nan
    return float(t.ppf(0.975, df))


def interpret(runs: list[dict], summary: dict[str, dict], n_test: int | None) -> tuple[list[str], list[str]]:
    """The report's "shows" and "does not show" bullets, computed from the numbers."""
    shows, not_shown = [], []
    seeds = sorted({r["seed"] for r in runs}, key=str)
    verdicts = []
    for method in [m for m in summary if m != "grpo"] or ["corrpo"]:
        label = f"{LABELS.get(method, method)} minus GRPO"
        for name, key in (("end test accuracy", "end_acc"), ("final inversion strength", "strength")):
            sentence, significant = _difference_sentence(name, paired_differences(runs, key, a=method), label=label)
            shows.append(sentence)
            verdicts.append(significant)
    if n_test:
        p = statistics.fmean([r["end_acc"] for r in runs if not math.isnan(r["end_acc"])] or [math.nan])
        if not math.isnan(p):
            binom = math.sqrt(p * (1 - p) / n_test)
            shows.append(
                f"Sampling noise of one accuracy on {n_test} test problems at p = {p:.3f} is about ±{binom:.3f} "
                f"(one binomial standard error); two standard errors is ±{2 * binom:.3f}."
            )
    starts = [r["start_acc"] for r in runs if not math.isnan(r["start_acc"])]
    if starts:
        gains = {m: mean_std([r["end_acc"] - r["start_acc"] for r in runs if r["method"] == m]) for m in summary}
        text = "; ".join(f"{m} {fmt_number(g[0], 3)}" for m, g in gains.items())
        shows.append(
            f"All methods start RL from the same SFT policy (test accuracy {statistics.fmean(starts):.3f}); mean "
            f"accuracy change over RL: {text}."
        )
    finals = [r["spearman"] for r in runs if not math.isnan(r["spearman"])]
    if finals:
        positive = sum(rho > 0 for rho in finals)
        if positive == len(finals):
            shows.append(
                f"The tracker's final Spearman rho is positive in all {len(finals)} runs (range "
                f"{min(finals):.3f} to {max(finals):.3f}): in this tiny model higher-entropy tokens have *larger* "
                "logit-gradient norms (rank correlation over the probe tokens), so the inversion (rho < 0) has "
                "not emerged and the strength (-rho) is negative for "
                "every method."
            )
        elif positive == 0:
            shows.append(
                f"The tracker's final Spearman rho is negative in all {len(finals)} runs (range "
                f"{min(finals):.3f} to {max(finals):.3f}): the inversion is present for every method."
            )
        else:
            shows.append(
                f"The final Spearman rho is positive in {positive} and negative in {len(finals) - positive} of "
                f"{len(finals)} runs (range {min(finals):.3f} to {max(finals):.3f}): the sign is not stable."
            )
        changes = "; ".join(f"{m} {fmt_number(s['rho_change'][0], 3)}" for m, s in summary.items())
        shows.append(f"Mean change of rho over the RL phase (last row minus first row): {changes}.")
    if verdicts and all(v is False for v in verdicts):
        shows.append("Overall: on this setup the methods are indistinguishable at this number of seeds.")

    not_shown.append(
        f"Anything about larger models, other tasks or longer training: {len(seeds)} seed(s), one tiny model "
        "trained from scratch, one synthetic arithmetic task, one CorR-PO coefficient "
        f"({', '.join(fmt_number(float(s['coef']), 3) for m, s in summary.items() if m == 'corrpo') or 'n/a'}), "
        f"{max((r['rl_steps'] for r in runs), default=0)} RL steps."
    )
    not_shown.append(
        "That a difference smaller than about two standard errors (seed-to-seed or test-set sampling) is real: "
        "such differences are reported above as noise."
    )
    not_shown.append(
        "A causal link between inversion strength and accuracy: the accuracy-vs-strength plot has one point per "
        "run and mixes the effect of the method with seed noise."
    )
    not_shown.append(
        "The rollout-level correlation CorR-PO rewards is not the tracked rho: the report's rho is the "
        "InversionTracker's (fixed probe set, reference responses); the per-response training signal is in the "
        "runs' wandb logs (rl/inversion/rollout_*), not summarized here."
    )
    not_shown.append(
        "Speed: wall times come from one run each on a shared CPU machine; use benchmarks/rl_step.py for the "
        "per-step cost of CorR-PO."
    )
    return shows, not_shown


# ----------------------------------------------------------------------------------------- reporting
def _rel(path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except (TypeError, ValueError):
        return str(path)


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_table(runs: list[dict], relative_to: Path | None = None) -> str:
    """Markdown table, one row per run."""
    rows = []
    for r in runs:
        run_dir = Path(r["run_dir"])
        if relative_to is not None:
            try:
                run_dir = run_dir.resolve().relative_to(relative_to.resolve())
            except ValueError:
                pass
        rows.append(
            [
                str(r["method"]),
                str(r["seed"]),
                fmt_number(float(r["coef"]), 3),
                fmt_number(r["start_acc"]),
                fmt_number(r["end_acc"]),
                fmt_number(r["spearman"]),
                fmt_number(r["strength"]),
                str(r["rl_steps"]),
                fmt_number(r["wall_s"], 0),
                f"`{run_dir}`",
            ]
        )
    header = ["method", "seed", "coef", "acc start", "acc end", "final rho", "strength", "RL steps", "wall s", "run"]
    return _table(rows, header)


def summary_table(summary: dict[str, dict]) -> str:
    """Markdown table, one row per method, mean ± std over seeds."""
    rows = [
        [
            m,
            str(s["n"]),
            fmt_number(float(s["coef"]), 3),
            fmt_mean_std(s["start_acc"]),
            fmt_mean_std(s["end_acc"]),
            fmt_mean_std(s["spearman"]),
            fmt_mean_std(s["strength"]),
            fmt_mean_std(s["rho_change"]),
            fmt_mean_std(s["wall_s"], 0),
        ]
        for m, s in summary.items()
    ]
    header = ["method", "runs", "coef", "acc start", "acc end", "final rho", "strength (-rho)", "rho change", "wall s"]
    return _table(rows, header)


def make_plots(runs: list[dict], emergence_png: Path, accuracy_png: Path) -> None:
    """Emergence curves of all runs (coloured by method) and end accuracy vs final strength (corrpo.runs.analysis)."""
    dirs = [Path(r["run_dir"]) for r in runs]
    df = load_emergence(dirs)
    names = {str(Path(r["run_dir"])): f"{r['method']}-s{r['seed']}" for r in runs}
    df["run"] = df["run_dir"].map(names).fillna(df["run"])
    fig = plot_emergence(df)
    fig.axes[0].set_xlabel("RL step (batches); all runs start from the same SFT policy")
    fig.savefig(emergence_png, dpi=120)
    plt.close(fig)
    fig = plot_accuracy_vs_inversion(final_points(df))
    fig.savefig(accuracy_png, dpi=120)
    plt.close(fig)


def write_comparison_report(
    report: Path,
    runs: list[dict],
    settings: dict,
    command: str,
    sft: dict | None = None,
    n_test: int | None = None,
) -> dict[str, dict]:
    """Write the comparison's markdown report (settings, per-run and per-method tables, what the numbers show and
    do not show) and its two plots (``<stem>_emergence.png``, ``<stem>_accuracy.png``) beside it.

    Named apart from :func:`corrpo.runs.report.write_report`, which writes one run's ``summary.md``. Returns the
    per-method summary.
    """
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    emergence_png = report.with_name(f"{report.stem}_emergence.png")
    accuracy_png = report.with_name(f"{report.stem}_accuracy.png")
    make_plots(runs, emergence_png, accuracy_png)
    summary = summarize(runs)
    shows, not_shown = interpret(runs, summary, n_test)
    title = " vs ".join(LABELS.get(m, m) for m in summary)
    lines = [
        f"# {title} on the tiny arithmetic task",
        "",
        f"Generated by `benchmarks/compare.py` on {time.strftime('%Y-%m-%d %H:%M')}; every number below is "
        "computed from the run folders listed in the per-run table.",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Settings",
        "",
    ]
    lines += [f"- {key}: `{value}`" for key, value in settings.items()]
    if sft:
        lines += [
            f"- shared SFT policy: `{_rel(sft.get('policy'))}` (SFT run folder `{_rel(sft.get('run_dir'))}`, "
            f"test accuracy after SFT {fmt_number(sft.get('end_acc', math.nan))}, "
            + (
                "wall not measured: given with --sft-policy)"
                if math.isnan(sft.get("wall_s", math.nan))
                else f"wall {fmt_number(sft['wall_s'], 0)} s)"
            )
        ]
    lines += [
        "",
        "Each RL run: `corrpo fit --config <config> --model.policy <sft policy> --model.sft.steps 0 "
        "--seed_everything <seed> --data.seed <seed> --data.arithmetic.seed 0 --model.rl.inversion.coef <coef> "
        "--model.rl.steps <RL steps>`"
        " (coef 0 = plain GRPO; `top_entropy` adds `--model.rl.top_entropy_quantile <q>` to plain GRPO)."
        " Accuracy is greedy test accuracy; rho is the InversionTracker's Spearman "
        "correlation (last row of `emergence.csv`), strength = -rho (higher = stronger inversion).",
        "",
        "## Per run",
        "",
        run_table(runs, relative_to=ROOT),
        "",
        "## Per method (mean ± std over seeds)",
        "",
        summary_table(summary),
        "",
        "## Plots",
        "",
        f"![emergence curves]({emergence_png.name})",
        "",
        f"![accuracy vs inversion strength]({accuracy_png.name})",
        "",
        "## What this shows",
        "",
    ]
    lines += [f"- {s}" for s in shows]
    lines += ["", "## What this does not show", ""]
    lines += [f"- {s}" for s in not_shown]
    report.write_text("\n".join(lines) + "\n")
    return summary


def result_line(summary: dict[str, dict]) -> str:
    """``RESULT grpo_acc=... corrpo_acc=... grpo_strength=... corrpo_strength=...`` (means; nan when absent)."""

    def mean(method: str, key: str) -> str:
        value = summary.get(method, {}).get(key, (math.nan, math.nan))[0]
        return "nan" if math.isnan(value) else f"{value:.4f}"

    line = (
        f"RESULT grpo_acc={mean('grpo', 'end_acc')} corrpo_acc={mean('corrpo', 'end_acc')} "
        f"grpo_strength={mean('grpo', 'strength')} corrpo_strength={mean('corrpo', 'strength')}"
    )
    if "top_entropy" in summary:
        acc, strength = mean("top_entropy", "end_acc"), mean("top_entropy", "strength")
        line += f" top_entropy_acc={acc} top_entropy_strength={strength}"
    return line
