"""Does the CorR-PO term move what it rewards? GRPO with the control against CorR-PO at several lambdas, both modes.

What it does:

1. Derives a study config from ``--config`` (written to ``<out>/config.yaml``): per-step logging
   (``log_every_n_steps: 1``, an offline WandbLogger) and the inversion tracker every ``--probe-every`` steps.
2. One SFT run (``--model.rl.steps 0``) into ``<out>/sft``, unless ``--sft-policy`` names a policy folder: every arm
   starts RL from this one policy.
3. For each seed, the control (GRPO, ``rl.inversion.log_only: true``: the per-response statistic scored, nothing else
   changed) and CorR-PO at each ``--coefs`` in each ``--modes`` (``rl.inversion.apply``), RL only, the seed setting
   ``seed_everything`` and ``data.seed``. ``--reuse`` collects a finished run instead of training it again.
4. Collects per run and RL step the rewarded statistic (``rl/inversion/rollout_spearman``: each response's own
   entropy-strength Spearman rho, averaged over the step's valid responses), ``rl/frac_reward_zero_std`` and
   ``rl/rewards/accuracy/mean`` from the run's wandb history, the probe-set rho and its anatomy factors from
   ``emergence.csv``, and the end test accuracy from ``results.json``; writes a markdown report (``--report``) with
   means and 95% t-intervals over seeds, every arm paired by seed against the control, a per-step figure beside it,
   and the plain answers, computed from those numbers: does the term lower what it rewards, does its effect grow with
   lambda, does the probe-set fingerprint follow, and which anatomy factor moves most where it does not.

Usage::

    python benchmarks/corrpo_direction.py [--config configs/tiny-inversion.yaml] [--seeds 0 1 2 3]
        [--coefs 0.05 0.2 0.5] [--modes reward advantage] [--probe-every 4] [--out runs/direction]
        [--report <out>/results.md] [--sft-policy DIR] [--reuse]

The last line is ``RESULT arms=<n> seeds=<n> lowered=<arms whose statistic is below the control's, 95%>
raised=<arms above it> probe_lowered=<n> probe_raised=<n>``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from compare import find_run_dir, run_fit, tag_results  # noqa: E402
from scipy import stats  # noqa: E402

from corrpo.runs.report import find_wandb_logs, run_history  # noqa: E402
from corrpo.runs.run_folder import RunFolder  # noqa: E402

CONTROL = "control"
STEP_KEYS = {
    "statistic": "rl/inversion/rollout_spearman",
    "zero_std": "rl/frac_reward_zero_std",
    "accuracy": "rl/rewards/accuracy/mean",
}


# --------------------------------------------------------------------------------------------- the runs
def study_config(config: Path, out: Path, probe_every: int) -> Path:
    """``config`` with per-step logging (an offline WandbLogger, ``log_every_n_steps: 1``) and the tracker every
    ``probe_every`` steps, written to ``<out>/config.yaml``."""
    data = yaml.safe_load(config.read_text())
    trainer = data.setdefault("trainer", {})
    trainer["log_every_n_steps"] = 1
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "corrpo-direction", "name": config.stem},
    }
    trackers = [c for c in trainer.get("callbacks", []) if c.get("class_path", "").endswith("InversionTracker")]
    if not trackers:
        raise SystemExit(f"{config}: the study needs an InversionTracker among trainer.callbacks (the probe rho)")
    trackers[0].setdefault("init_args", {})["every_n_steps"] = probe_every
    out.mkdir(parents=True, exist_ok=True)
    derived = out / "config.yaml"
    derived.write_text(yaml.safe_dump(data, sort_keys=False))
    return derived


def arms(coefs: list[float], modes: list[str]) -> list[tuple[str, list[str]]]:
    """``(name, extra CLI args)``: the control first, then each mode at each lambda."""
    out = [(CONTROL, ["--model.rl.inversion.coef", "0", "--model.rl.inversion.log_only", "true"])]
    for mode in modes:
        for coef in coefs:
            args = ["--model.rl.inversion.coef", str(coef), "--model.rl.inversion.apply", mode]
            out.append((f"{mode}-{coef:g}", args))
    return out


def history(run_dir: Path) -> dict[str, dict[int, float]]:
    """Per RL batch index, each :data:`STEP_KEYS` value of the run's wandb history."""
    rows, error = run_history(find_wandb_logs(run_dir))
    if error:
        raise SystemExit(f"{run_dir}: {error}")
    series: dict[str, dict[int, float]] = {name: {} for name in STEP_KEYS}
    for row in rows:
        step = row.get("batches")
        for name, key in STEP_KEYS.items():
            value = row.get(key)
            if step is not None and isinstance(value, int | float) and math.isfinite(value):
                series[name][int(step)] = float(value)
    return series


def collect(run_dir: Path) -> dict:
    """One run's numbers: the per-step series, the probe rows (rho and anatomy factors by batch), end accuracy."""
    run = RunFolder(run_dir)
    probe = run.read_emergence()
    return {
        "series": history(run_dir),
        "probe": probe,
        "end_acc": run.test_accuracy("end"),
        "start_acc": run.test_accuracy("start"),
    }


# ------------------------------------------------------------------------------------------ statistics
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% Student-t interval (NaN with fewer than 2 values)."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return float(np.mean(values)), math.nan
    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return float(np.mean(values)), float(stats.t.ppf(0.975, len(values) - 1)) * sem


def late_mean(series: dict[int, float]) -> float:
    """The mean over the second half of the RL steps (the statistic after the term had time to act)."""
    if not series:
        return math.nan
    steps = sorted(series)
    late = steps[len(steps) // 2 :]
    return float(np.mean([series[s] for s in late]))


def probe_end(probe, column: str = "spearman") -> float:
    """The probe-set value of ``column`` at the run's last tracker row."""
    if probe is None or probe.empty or column not in probe:
        return math.nan
    return float(probe.sort_values("batches")[column].iloc[-1])


def paired_arms(results: dict, arm: str, other: str, value) -> list[float]:
    """``value(arm's run) - value(other's run)``, seed by seed (the same SFT policy and seed)."""
    seeds = sorted(set(results[arm]) & set(results[other]))
    return [value(results[arm][s]) - value(results[other][s]) for s in seeds]


def paired(results: dict, arm: str, value) -> list[float]:
    """:func:`paired_arms` against the control."""
    return paired_arms(results, arm, CONTROL, value)


def verdict(pair: tuple[float, float]) -> str:
    """``lower`` / ``higher`` when the 95% interval of a difference excludes 0, else ``unresolved``."""
    mean, half = pair
    if not math.isfinite(half):
        return "unresolved"
    if mean + half < 0:
        return "lower"
    if mean - half > 0:
        return "higher"
    return "unresolved"


PHRASES = {
    "lower": "lower than the control's",
    "higher": "higher than the control's",
    "unresolved": "not resolved from the control's",
}


# ------------------------------------------------------------------------------------------ the report
def fmt(pair: tuple[float, float], digits: int = 3) -> str:
    mean, half = pair
    if not math.isfinite(mean):
        return "-"
    return f"{mean:+.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else f"{mean:+.{digits}f}"


def per_step(results: dict, arm: str, name: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and 95% half-width over seeds of series ``name`` of ``arm``."""
    runs = list(results[arm].values())
    steps = sorted(set().union(*(r["series"][name] for r in runs)))
    means, halves = [], []
    for step in steps:
        m, h = mean_ci([r["series"][name].get(step, math.nan) for r in runs])
        means.append(m)
        halves.append(h)
    return steps, means, halves


PANELS = {
    "statistic": ("rollout Spearman rho", "what CorR-PO rewards"),
    "accuracy": ("rl/rewards/accuracy/mean", "task accuracy on the rollouts"),
    "zero_std": ("rl/frac_reward_zero_std", "groups whose rewards all agree"),
}


def plot(results: dict, path: Path) -> None:
    """Per RL step (mean and 95% band over seeds, every arm): the rewarded statistic, the rollouts' accuracy, the
    fraction of zero-variance groups; and the probe-set rho at each tracker row."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for arm in results:
        width = 2.2 if arm == CONTROL else 1.2
        color = None
        for ax, name in zip(axes, PANELS, strict=False):
            steps, means, halves = per_step(results, arm, name)
            line = ax.plot(steps, means, label=arm, lw=width, color=color)[0]
            color = line.get_color()
            lo, hi = np.array(means) - np.nan_to_num(halves), np.array(means) + np.nan_to_num(halves)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.12)
        probes = [r["probe"].sort_values("batches") for r in results[arm].values()]
        batches = sorted(set().union(*(set(p["batches"]) for p in probes)))
        rho = [
            mean_ci([float(p.loc[p["batches"] == b, "spearman"].iloc[-1]) for p in probes if b in set(p["batches"])])[0]
            for b in batches
        ]
        axes[3].plot(batches, rho, marker="o", ms=3, color=color, label=arm, lw=width)
    for ax, (ylabel, title) in zip(axes, PANELS.values(), strict=False):
        ax.set(xlabel="RL step", ylabel=ylabel, title=title)
    axes[3].set(xlabel="RL step", ylabel="probe-set Spearman rho", title="the tracked fingerprint")
    for ax in (axes[0], axes[3]):
        ax.axhline(0, color="grey", lw=0.6)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def anatomy_columns(results: dict) -> list[str]:
    any_run = next(iter(results[CONTROL].values()))
    return [c for c in any_run["probe"].columns if c.startswith("anatomy_")]


def report(results: dict, context: dict, path: Path) -> dict[str, int]:
    """Writes the markdown report and its figure; returns the counts of the RESULT line."""
    figure = path.with_name(path.stem + "_steps.png")
    plot(results, figure)
    lines = [f"# Does CorR-PO move what it rewards? ({context['config']})", ""]
    lines += [
        f"Command: `{context['command']}`  ",
        f"SFT policy: `{context['sft']}` (probe rho at SFT end {context['sft_rho']:+.3f}); "
        f"{context['rl_steps']} RL steps; seeds {context['seeds']}; the control is GRPO with "
        "`rl.inversion.log_only: true` (the rewarded statistic scored, nothing else changed).",
        "",
        "Intervals are 95% Student-t over seeds; differences are paired by seed against the control (same SFT "
        "policy, same seed). The rewarded statistic is each RL step's mean per-response Spearman rho, averaged over "
        "the second half of the RL steps. `frac_reward_zero_std` is TRL's: over the total reward, so with "
        "`apply: reward` the bonus itself breaks the task reward's ties.",
        "",
        f"![per-step statistic and probe rho]({figure.name})",
        "",
        "| arm | rewarded statistic (late mean) | minus control | probe rho at end | minus control | "
        "frac_reward_zero_std | end test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    counts = {"lowered": 0, "raised": 0, "probe_lowered": 0, "probe_raised": 0}
    answers, anatomy = [], anatomy_columns(results)
    effects: dict[str, list[tuple[float, str]]] = {}
    for arm, runs in results.items():
        late = mean_ci([late_mean(r["series"]["statistic"]) for r in runs.values()])
        probe = mean_ci([probe_end(r["probe"]) for r in runs.values()])
        zero = mean_ci([float(np.mean(list(r["series"]["zero_std"].values()) or [math.nan])) for r in runs.values()])
        acc = mean_ci([r["end_acc"] for r in runs.values()])
        if arm == CONTROL:
            lines.append(f"| {arm} | {fmt(late)} | - | {fmt(probe)} | - | {fmt(zero)} | {fmt(acc)} |")
            continue
        d_late = mean_ci(paired(results, arm, lambda r: late_mean(r["series"]["statistic"])))
        d_probe = mean_ci(paired(results, arm, lambda r: probe_end(r["probe"])))
        cells = [arm, fmt(late), fmt(d_late), fmt(probe), fmt(d_probe), fmt(zero), fmt(acc)]
        lines.append("| " + " | ".join(cells) + " |")
        v, vp = verdict(d_late), verdict(d_probe)
        counts["lowered"] += v == "lower"
        counts["raised"] += v == "higher"
        counts["probe_lowered"] += vp == "lower"
        counts["probe_raised"] += vp == "higher"
        mode, coef = arm.rsplit("-", 1)
        effects.setdefault(mode, []).append((float(coef), d_late[0]))
        line = f"- **{arm}**: the rewarded statistic is {PHRASES[v]} ({fmt(d_late)}); the probe rho is {PHRASES[vp]}"
        line += f" ({fmt(d_probe)})"
        if anatomy and vp != "lower":
            moved = [(mean_ci(paired(results, arm, lambda r, c=c: probe_end(r["probe"], c))), c) for c in anatomy]
            moved = [m for m in moved if math.isfinite(m[0][0])]
            if moved:
                (pair, column) = max(moved, key=lambda m: abs(m[0][0]))
                line += f"; the anatomy factor that moved most is `{column[len('anatomy_') :]}` ({fmt(pair)})"
        answers.append(line + ".")
    lines += ["", "## The plain answers", ""]
    lines += [
        f"- **Does the term lower what it rewards?** In {counts['lowered']} of {len(results) - 1} arms the rewarded "
        f"statistic ends below the control's (95%), in {counts['raised']} above it, in the rest no difference is "
        "resolved.",
    ]
    for mode, pairs in effects.items():
        pairs.sort()
        seq = ", ".join(f"lambda {c:g}: {d:+.3f}" for c, d in pairs)
        question = f"- **Does the effect grow with lambda ({mode})?** The mean difference from the control: {seq}"
        if len(pairs) < 2:
            lines.append(f"{question}: one lambda, no trend to read.")
            continue
        small, large = f"{mode}-{pairs[0][0]:g}", f"{mode}-{pairs[-1][0]:g}"
        spread = mean_ci(paired_arms(results, large, small, lambda r: late_mean(r["series"]["statistic"])))
        lines.append(
            f"{question}. Lambda {pairs[-1][0]:g} minus lambda {pairs[0][0]:g}, paired by seed: {fmt(spread)}: "
            f"the statistic is {PHRASES[verdict(spread)].replace('the control', f'lambda {pairs[0][0]:g}')}."
        )
    lines.append(
        f"- **Does the probe-set fingerprint follow?** Lower than the control's in {counts['probe_lowered']} arms, "
        f"higher in {counts['probe_raised']}, unresolved in the rest."
    )
    lines += ["", "Per arm:", "", *answers, ""]
    path.write_text("\n".join(lines) + "\n")
    return counts


# ---------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny-inversion.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--coefs", type=float, nargs="+", default=[0.05, 0.2, 0.5], help="CorR-PO's lambdas")
    parser.add_argument("--modes", nargs="+", choices=("reward", "advantage"), default=["reward", "advantage"])
    parser.add_argument("--probe-every", type=int, default=4, help="the tracker's every_n_steps (default: 4)")
    parser.add_argument("--rl-steps", type=int, default=None, help="RL steps (default: the config's)")
    parser.add_argument("--sft-policy", default=None, help="an existing SFT policy folder; skips the SFT run")
    parser.add_argument("--out", default="runs/direction")
    parser.add_argument("--report", default=None, help="the markdown report (default: <out>/results.md)")
    parser.add_argument("--reuse", action="store_true", help="collect a finished run instead of training it again")
    args = parser.parse_args(argv)
    if any(c <= 0 for c in args.coefs):
        parser.error("--coefs must be > 0 (lambda 0 is the control, which always runs)")
    return args


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(args.out).resolve()
    config = study_config(Path(args.config).resolve(), out, args.probe_every)
    if args.sft_policy:
        policy = Path(args.sft_policy).resolve()
        sft_dir = policy.parent
    else:
        sft_dir = find_run_dir(out / "sft") if args.reuse else None
        if sft_dir is None:
            sft_dir, _ = run_fit(config, ["--model.rl.steps", "0"], out / "sft")
        policy = sft_dir / "policy"
    rl_steps = args.rl_steps or int(yaml.safe_load(config.read_text())["model"]["rl"]["steps"])
    results: dict[str, dict[int, dict]] = {}
    for name, extra in arms(args.coefs, args.modes):
        for seed in args.seeds:
            root = out / name / f"seed{seed}"
            run_dir = find_run_dir(root) if args.reuse else None
            if run_dir is None:
                common = ["--model.policy", str(policy), "--model.sft.steps", "0", "--model.rl.steps", str(rl_steps)]
                # the same problems and test set for every seed (an unset data.arithmetic.seed follows seed_everything)
                seeds = ["--seed_everything", str(seed), "--data.seed", str(seed), "--data.arithmetic.seed", "0"]
                run_dir, wall = run_fit(config, common + seeds + extra, root)
                tag_results(run_dir, arm=name, seed=seed, wall_s=round(wall, 1))
            results.setdefault(name, {})[seed] = collect(run_dir)
            print(f"[direction] {name} seed {seed}: {run_dir}", flush=True)
    context = {
        "config": args.config,
        "command": "python benchmarks/corrpo_direction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sft": sft_dir,
        "sft_rho": probe_end(RunFolder(sft_dir).read_emergence()),
        "rl_steps": rl_steps,
        "seeds": " ".join(map(str, args.seeds)),
    }
    path = Path(args.report) if args.report else out / "results.md"
    counts = report(results, context, path)
    print(f"[direction] report: {path}")
    print(
        f"RESULT arms={len(results) - 1} seeds={len(args.seeds)} lowered={counts['lowered']} "
        f"raised={counts['raised']} probe_lowered={counts['probe_lowered']} probe_raised={counts['probe_raised']}"
    )
    return counts


if __name__ == "__main__":
    main()
