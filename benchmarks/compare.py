"""Plain GRPO vs CorR-PO (and the 80/20 entropy baseline) from one shared SFT policy, on the embedded tiny
arithmetic task, over a few seeds.

What it does:

1. One SFT run (``configs/tiny.yaml`` with ``--model.rl.steps 0``) into ``<out>/sft``, unless ``--sft-policy``
   names an existing policy folder. Both methods start RL from this same policy.
2. For each seed and each method, one RL-only run from that policy (``--model.sft.steps 0``), with the seed
   setting ``seed_everything`` (sampling) and ``data.seed`` (batch order). ``grpo`` uses
   ``--model.rl.inversion.coef 0``, ``corrpo`` uses ``--coef``, ``top_entropy`` is GRPO trained only on the
   top ``--top-entropy-quantile`` tokens by entropy ("Beyond the 80/20 rule", TRL's ``top_entropy_quantile``),
   the closest published entropy-aware baseline. Everything else is the config's. The test set
   (``data.n_test`` problems, fixed by ``data.arithmetic.seed``) is the same for every run. Each run's
   ``results.json`` gets ``method``, ``coef`` and ``seed`` keys so ``corrpo.analysis`` labels it. With
   ``--reuse`` a method/seed that already has a finished run under ``<out>`` is collected, not trained again.
3. Collects per run: test accuracy at the start of RL (the SFT policy) and at the end, the last row of
   ``emergence.csv`` (Spearman rho of the inversion tracker; strength = -rho) and wall time; writes a
   markdown report (``--report``) with per-run and per-method (mean +- std) tables, two plots next to it
   (``<report>_emergence.png``, ``<report>_accuracy.png``) and a "What this shows / does not show" section
   whose statements are computed from the numbers.

What it does not show: anything beyond this tiny model (configs/tiny.yaml: hidden size 128, 4 layers, under a
million parameters, trained from scratch), this synthetic task, one CorR-PO coefficient and a short RL phase on
CPUs. With a handful of seeds and a 200-problem test set, differences smaller than about two standard errors are
reported as noise, not as an effect. Wall times are measured on whatever else the machine is running and are
indicative only.

Usage::

    python benchmarks/compare.py [--seeds 0 1 2] [--methods grpo corrpo top_entropy] [--coef 0.1]
                                 [--top-entropy-quantile 0.2] [--rl-steps N] [--sft-policy DIR]
                                 [--out runs/compare] [--report docs/results.md] [--jobs 1]
                                 [--collect-only | --reuse]

The last printed line is ``RESULT grpo_acc=<m> corrpo_acc=<m> grpo_strength=<m> corrpo_strength=<m>``
(means over seeds), followed by ``top_entropy_acc=<m> top_entropy_strength=<m>`` when that method ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("grpo", "corrpo", "top_entropy")
LABELS = {"grpo": "GRPO", "corrpo": "CorR-PO", "top_entropy": "80/20 (top-entropy tokens)"}
# The fields the report's tables show per run, in order.
RUN_FIELDS = ("method", "seed", "coef", "start_acc", "end_acc", "spearman", "strength", "rl_steps", "wall_s")


# ------------------------------------------------------------------------------------------ running
def fit_command(config: Path, extra: list[str]) -> list[str]:
    """``python -m corrpo.cli fit --config <config> <extra...>`` with this interpreter."""
    return [sys.executable, "-m", "corrpo.cli", "fit", "--config", str(config), *extra]


def find_run_dir(root: Path, exclude: set[Path] | frozenset = frozenset()) -> Path | None:
    """The newest run folder (one holding ``results.json``) directly under ``root``, ignoring ``exclude``."""
    if not root.is_dir():
        return None
    dirs = [d for d in root.iterdir() if d.is_dir() and (d / "results.json").is_file() and d not in exclude]
    return max(dirs, key=lambda d: d.name) if dirs else None


def run_fit(config: Path, extra: list[str], root: Path) -> tuple[Path, float]:
    """Run one fit with ``--trainer.default_root_dir root``; return (its run folder, wall seconds).

    The log goes to ``<root>/fit-<time>.log``; a failed run raises with the log's tail.
    """
    root.mkdir(parents=True, exist_ok=True)
    before = {d for d in root.iterdir() if d.is_dir()}
    command = fit_command(config, [*extra, "--trainer.default_root_dir", str(root)])
    log = root / f"fit-{time.strftime('%Y%m%d-%H%M%S')}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("WANDB_MODE", "offline")
    print(f"[compare] {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    run_dir = find_run_dir(root, exclude=before)
    if code != 0 or run_dir is None:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"fit failed (exit {code}, run folder {run_dir}); log {log}:\n{tail}")
    print(f"[compare]   -> {run_dir} ({wall:.0f} s)", flush=True)
    return run_dir, wall


def wall_from_log(run_dir: Path) -> float:
    """Wall seconds of a finished run from the log :func:`run_fit` wrote beside it: the log is named after the
    run's start (``fit-<YYYYmmdd-HHMMSS>.log``, created just before the run folder) and last written at its end.
    NaN when no such log exists. For runs made before ``results.json`` carried ``wall_s``."""
    started = [
        (time.mktime(time.strptime(log.stem[4:], "%Y%m%d-%H%M%S")), log)
        for log in Path(run_dir).parent.glob("fit-*.log")
        if log.stem[4:] <= Path(run_dir).name[:15]
    ]
    if not started:
        return math.nan
    start, log = max(started)
    return round(log.stat().st_mtime - start, 1)


def tag_results(run_dir: Path, **tags) -> None:
    """Add ``tags`` (e.g. method, coef, seed) to the run's ``results.json``."""
    path = Path(run_dir) / "results.json"
    results = json.loads(path.read_text())
    results.update(tags)
    path.write_text(json.dumps(results, indent=2))


# --------------------------------------------------------------------------------------- collecting
def _accuracy(results: dict, when: str) -> float:
    values = [r["accuracy"] for r in results.get("test_accuracy", []) if r.get("when") == when]
    return float(values[-1]) if values else math.nan


def collect_run(run_dir: Path, wall_s: float = math.nan, **defaults) -> dict:
    """One run's numbers: method/coef/seed (results.json, else ``defaults``), start and end test accuracy, the
    last ``emergence.csv`` row's Spearman rho and strength (-rho), the first row's rho, RL steps and wall time.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    emergence = pd.read_csv(run_dir / "emergence.csv").sort_values("batches", kind="stable")
    last, first = emergence.iloc[-1], emergence.iloc[0]
    ends = [r for r in results.get("test_accuracy", []) if r.get("when") == "end"]
    spearman = float(last["spearman"])
    return {
        "method": results.get("method", defaults.get("method", "run")),
        "seed": results.get("seed", defaults.get("seed")),
        "coef": results.get("coef", defaults.get("coef", math.nan)),
        "start_acc": _accuracy(results, "start"),
        "end_acc": _accuracy(results, "end"),
        "spearman_start": float(first["spearman"]),
        "spearman": spearman,
        "strength": -spearman,
        "rl_steps": int(ends[-1]["step"]) if ends else int(last["batches"]),
        "wall_s": float(results.get("wall_s", math.nan)) if math.isnan(wall_s) else float(wall_s),
        "run_dir": str(run_dir),
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


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(pair: tuple[float, float], digits: int = 3) -> str:
    mean, std = pair
    return _fmt(mean, digits) if math.isnan(std) else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _difference_sentence(
    name: str, diffs: list[float], digits: int = 3, label: str = "CorR-PO minus GRPO"
) -> tuple[str, bool | None]:
    """A sentence on the paired difference and whether it exceeds two standard errors (None: cannot tell)."""
    if not diffs:
        return f"No seed has both methods of {label}, so no paired {name} difference can be computed.", None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return (
            f"{label} {name}: {_fmt(mean, digits)} from a single seed; with one seed there is no "
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
        text = "; ".join(f"{m} {_fmt(g[0], 3)}" for m, g in gains.items())
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
        changes = "; ".join(f"{m} {_fmt(s['rho_change'][0], 3)}" for m, s in summary.items())
        shows.append(f"Mean change of rho over the RL phase (last row minus first row): {changes}.")
    if verdicts and all(v is False for v in verdicts):
        shows.append("Overall: on this setup the methods are indistinguishable at this number of seeds.")

    not_shown.append(
        f"Anything about larger models, other tasks or longer training: {len(seeds)} seed(s), one tiny model "
        "trained from scratch, one synthetic arithmetic task, one CorR-PO coefficient "
        f"({', '.join(_fmt(float(s['coef']), 3) for m, s in summary.items() if m == 'corrpo') or 'n/a'}), "
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
        "runs' wandb logs (inversion/rollout_*), not summarized here."
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
                _fmt(float(r["coef"]), 3),
                _fmt(r["start_acc"]),
                _fmt(r["end_acc"]),
                _fmt(r["spearman"]),
                _fmt(r["strength"]),
                str(r["rl_steps"]),
                _fmt(r["wall_s"], 0),
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
            _fmt(float(s["coef"]), 3),
            _pm(s["start_acc"]),
            _pm(s["end_acc"]),
            _pm(s["spearman"]),
            _pm(s["strength"]),
            _pm(s["rho_change"]),
            _pm(s["wall_s"], 0),
        ]
        for m, s in summary.items()
    ]
    header = ["method", "runs", "coef", "acc start", "acc end", "final rho", "strength (-rho)", "rho change", "wall s"]
    return _table(rows, header)


def make_plots(runs: list[dict], emergence_png: Path, accuracy_png: Path) -> None:
    """Emergence curves of all runs (coloured by method) and end accuracy vs final strength, via corrpo.analysis."""
    import matplotlib.pyplot as plt

    from corrpo.analysis import final_points, load_emergence, plot_accuracy_vs_inversion, plot_emergence

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


def write_report(
    report: Path,
    runs: list[dict],
    settings: dict,
    command: str,
    sft: dict | None = None,
    n_test: int | None = None,
) -> dict[str, dict]:
    """Write the markdown report and its two plots (``<stem>_emergence.png``, ``<stem>_accuracy.png``).

    Returns the per-method summary.
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
            f"test accuracy after SFT {_fmt(sft.get('end_acc', math.nan))}, "
            + (
                "wall not measured: given with --sft-policy)"
                if math.isnan(sft.get("wall_s", math.nan))
                else f"wall {_fmt(sft['wall_s'], 0)} s)"
            )
        ]
    lines += [
        "",
        "Each RL run: `corrpo fit --config <config> --model.policy <sft policy> --model.sft.steps 0 "
        "--seed_everything <seed> --data.seed <seed> --model.rl.inversion.coef <coef> --model.rl.steps <RL steps>`"
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


def print_summary(runs: list[dict], summary: dict[str, dict]) -> None:
    print(f"{'method':11} {'seed':>4} {'acc0':>6} {'acc':>6} {'rho':>7} {'strength':>8} {'wall s':>7}")
    for r in runs:
        print(
            f"{r['method']:11} {r['seed']!s:>4} {_fmt(r['start_acc']):>6} {_fmt(r['end_acc']):>6} "
            f"{_fmt(r['spearman']):>7} {_fmt(r['strength']):>8} {_fmt(r['wall_s'], 0):>7}"
        )
    print()
    for m, s in summary.items():
        print(
            f"{m:11} n={s['n']} acc={_pm(s['end_acc'])} rho={_pm(s['spearman'])} strength={_pm(s['strength'])} "
            f"wall={_pm(s['wall_s'], 0)} s"
        )
    print(result_line(summary), flush=True)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", default="configs/tiny.yaml", help="the fit config (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds (default: 0 1 2)")
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run; grpo is the baseline"
    )
    parser.add_argument("--coef", type=float, default=0.1, help="CorR-PO's inversion coef (default: %(default)s)")
    parser.add_argument(
        "--top-entropy-quantile", type=float, default=0.2, help="top_entropy's kept token fraction (default: 0.2)"
    )
    parser.add_argument("--rl-steps", type=int, default=None, help="RL steps (default: the config's model.rl.steps)")
    parser.add_argument("--sft-policy", default=None, help="existing SFT policy folder; skips the SFT run")
    parser.add_argument("--out", default="runs/compare", help="root of all run folders (default: %(default)s)")
    parser.add_argument("--report", default="docs/results.md", help="markdown report (default: %(default)s)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="RL runs at a time (default: %(default)s); above 1 the runs share the CPUs, so wall times overlap",
    )
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="train nothing: report on the newest run under <out>/<method>/seed<seed> (wall times unknown)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="collect the newest finished run under <out> (SFT, each method/seed) instead of training it again",
    )
    args = parser.parse_args(argv)
    if "grpo" not in args.methods:
        parser.error("--methods must include grpo: every other method is compared with it, seed by seed")
    return args


def _abs(path: str) -> Path:
    path = Path(path)
    return path if path.is_absolute() else (Path.cwd() / path).resolve()


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    config, out, report = _abs(args.config), _abs(args.out), _abs(args.report)
    config_data = yaml.safe_load(config.read_text())
    rl_steps = args.rl_steps if args.rl_steps is not None else int(config_data["model"]["rl"]["steps"])
    n_test = config_data.get("data", {}).get("n_test")

    sft: dict = {}
    finished_sft = find_run_dir(out / "sft") if args.collect_only or args.reuse else None
    if args.sft_policy:
        policy = _abs(args.sft_policy)
        sft = {"policy": policy, "run_dir": policy.parent, "wall_s": math.nan}
    elif args.collect_only or finished_sft is not None:
        run_dir = finished_sft
        if run_dir is None:
            raise SystemExit(f"--collect-only: no SFT run under {out / 'sft'}")
        sft = {"policy": run_dir / "policy", "run_dir": run_dir, "wall_s": math.nan}
    else:
        run_dir, wall = run_fit(config, ["--model.rl.steps", "0"], out / "sft")
        sft = {"policy": run_dir / "policy", "run_dir": run_dir, "wall_s": wall}
    if (Path(sft["run_dir"]) / "results.json").is_file():
        sft["end_acc"] = _accuracy(json.loads((Path(sft["run_dir"]) / "results.json").read_text()), "end")

    methods = [m for m in METHODS if m in args.methods]
    reused: list[Path] = []
    plan = [(seed, method, args.coef if method == "corrpo" else 0.0) for seed in args.seeds for method in methods]

    def one(seed: int, method: str, coef: float) -> dict | None:
        root = out / method / f"seed{seed}"
        finished = find_run_dir(root) if args.reuse or args.collect_only else None
        if args.reuse and finished is not None:
            run_dir = finished
            print(f"[compare] --reuse: {run_dir}", flush=True)
            reused.append(run_dir)
            results = json.loads((run_dir / "results.json").read_text())
            wall = float(results.get("wall_s", wall_from_log(run_dir)))
            return collect_run(run_dir, wall, method=method, coef=coef, seed=seed)
        if args.collect_only:
            run_dir, wall = finished, math.nan
            if run_dir is None:
                print(f"[compare] no run under {root}; skipped", flush=True)
                return None
        else:
            extra = [
                "--model.policy", str(sft["policy"]),
                "--model.sft.steps", "0",
                "--model.rl.steps", str(rl_steps),
                "--seed_everything", str(seed),
                "--data.seed", str(seed),
                "--model.rl.inversion.coef", str(coef),
            ]  # fmt: skip
            tags = {}
            if method == "top_entropy":
                extra += ["--model.rl.top_entropy_quantile", str(args.top_entropy_quantile)]
                tags["top_entropy_quantile"] = args.top_entropy_quantile
            run_dir, wall = run_fit(config, extra, root)
            tag_results(run_dir, method=method, coef=coef, seed=seed, wall_s=round(wall, 1), **tags)
        return collect_run(run_dir, wall, method=method, coef=coef, seed=seed)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = [r for r in pool.map(lambda job: one(*job), plan) if r is not None]

    if not runs:
        raise SystemExit("no runs to report")
    command = shlex.join(["python", "benchmarks/compare.py", *(sys.argv[1:] if argv is None else argv)])
    settings = {
        "config": os.path.relpath(config, ROOT),
        "seeds": " ".join(map(str, args.seeds)),
        "methods": " ".join(methods),
        "CorR-PO coef": args.coef,
        "top-entropy quantile (top_entropy)": args.top_entropy_quantile,
        "RL steps": rl_steps,
        "test problems": n_test,
        "run root": os.path.relpath(out, ROOT),
        "RL runs at a time (--jobs)": args.jobs,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
    }
    if reused:
        settings["runs reused (--reuse)"] = (
            f"{len(reused)} of {len(runs)}, trained by an earlier invocation: their wall times were measured then, "
            "beside other runs, so compare wall times only between runs trained together"
        )
    summary = write_report(report, runs, settings, command, sft=sft, n_test=n_test)
    print(f"[compare] report: {report}", flush=True)
    print_summary(runs, summary)
    return summary


if __name__ == "__main__":
    main()
