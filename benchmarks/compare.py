"""Plain GRPO vs CorR-PO (and the 80/20 entropy baseline) from one shared SFT policy, on the embedded tiny
arithmetic task, over a few seeds.

What it does:

1. One SFT run (``configs/tiny.yaml`` with ``--model.rl.steps 0``) into ``<out>/sft``, unless ``--sft-policy``
   names an existing policy folder. Both methods start RL from this same policy.
2. For each seed and each method, one RL-only run from that policy (``--model.sft.steps 0``), with the seed
   setting ``seed_everything`` (sampling) and ``data.seed`` (batch order). ``grpo`` uses
   ``--model.rl.inversion.coef 0`` with ``log_only`` (the control: the per-response statistic CorR-PO rewards is
   scored and logged, nothing else changes; ``--no-control`` turns it off), ``corrpo`` uses ``--coef`` entered as
   ``--apply`` says (``rl.inversion.apply``), ``top_entropy`` is GRPO trained only on the
   top ``--top-entropy-quantile`` tokens by entropy ("Beyond the 80/20 rule", TRL's ``top_entropy_quantile``),
   the closest published entropy-aware baseline. Everything else is the config's. The test set
   (``data.n_test`` problems, fixed by ``data.arithmetic.seed``) is the same for every run. Each run's
   ``results.json`` gets ``method``, ``coef`` and ``seed`` keys so ``corrpo.runs.analysis`` labels it. With
   ``--reuse`` a method/seed that already has a finished run under ``<out>`` is collected, not trained again.
3. Collects per run: test accuracy at the start of RL (the SFT policy) and at the end, the last row of
   ``emergence.csv`` (Spearman rho of the inversion tracker; strength = -rho) and wall time; writes a
   markdown report (``--report``, default ``<out>/results.md``: the committed docs/results.md is only
   rewritten when asked for) with per-run and per-method (mean +- std) tables, two plots next to it
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
                                 [--out runs/compare] [--report <out>/results.md] [--jobs 1]
                                 [--collect-only | --reuse]

The last printed line is ``RESULT grpo_acc=<m> corrpo_acc=<m> grpo_strength=<m> corrpo_strength=<m>``
(means over seeds), followed by ``top_entropy_acc=<m> top_entropy_strength=<m>`` when that method ran.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from corrpo.runs.comparison import (
    METHODS,
    collect_run,
    fmt_mean_std,
    fmt_number,
    result_line,
    write_comparison_report,
)
from corrpo.runs.run_folder import RunFolder, newest_finished_run

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ running
def fit_command(config: Path, extra: list[str]) -> list[str]:
    """``python -m corrpo.cli fit --config <config> <extra...>`` with this interpreter."""
    return [sys.executable, "-m", "corrpo.cli", "fit", "--config", str(config), *extra]


def find_run_dir(root: Path, exclude: set[Path] | frozenset = frozenset()) -> Path | None:
    """The newest finished run folder directly under ``root``, ignoring ``exclude``."""
    run = newest_finished_run(root, exclude)
    return run.path if run is not None else None


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
    RunFolder(run_dir).tag_results(**tags)


def print_summary(runs: list[dict], summary: dict[str, dict]) -> None:
    print(f"{'method':11} {'seed':>4} {'acc0':>6} {'acc':>6} {'rho':>7} {'strength':>8} {'wall s':>7}")
    for r in runs:
        print(
            f"{r['method']:11} {r['seed']!s:>4} {fmt_number(r['start_acc']):>6} {fmt_number(r['end_acc']):>6} "
            f"{fmt_number(r['spearman']):>7} {fmt_number(r['strength']):>8} {fmt_number(r['wall_s'], 0):>7}"
        )
    print()
    for m, s in summary.items():
        print(
            f"{m:11} n={s['n']} acc={fmt_mean_std(s['end_acc'])} rho={fmt_mean_std(s['spearman'])} "
            f"strength={fmt_mean_std(s['strength'])} wall={fmt_mean_std(s['wall_s'], 0)} s"
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
        "--apply",
        choices=("reward", "advantage"),
        default="reward",
        help="where CorR-PO's term enters: rl.inversion.apply (default: %(default)s)",
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="run GRPO without rl.inversion.log_only (by default it logs the statistic CorR-PO rewards, untouched)",
    )
    parser.add_argument(
        "--top-entropy-quantile", type=float, default=0.2, help="top_entropy's kept token fraction (default: 0.2)"
    )
    parser.add_argument("--rl-steps", type=int, default=None, help="RL steps (default: the config's model.rl.steps)")
    parser.add_argument("--sft-policy", default=None, help="existing SFT policy folder; skips the SFT run")
    parser.add_argument("--out", default="runs/compare", help="root of all run folders (default: %(default)s)")
    parser.add_argument(
        "--report",
        default=None,
        help="markdown report, its two PNGs beside it (default: <out>/results.md, under runs/ and git-ignored; "
        "pass docs/results.md to refresh the committed page)",
    )
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
    config, out = _abs(args.config), _abs(args.out)
    report = _abs(args.report) if args.report else out / "results.md"
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
    if RunFolder(sft["run_dir"]).results.is_file():
        sft["end_acc"] = RunFolder(sft["run_dir"]).test_accuracy("end")

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
            wall = float(RunFolder(run_dir).read_results().get("wall_s", wall_from_log(run_dir)))
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
                "--data.arithmetic.seed", "0",  # the same problems and test set for every seed
                "--model.rl.inversion.coef", str(coef),
            ]  # fmt: skip
            tags = {}
            if method == "grpo" and not args.no_control:
                # the control: CorR-PO's per-response statistic scored and logged, rewards untouched
                extra += ["--model.rl.inversion.log_only", "true"]
                tags["log_only"] = True
            if method == "corrpo":
                extra += ["--model.rl.inversion.apply", args.apply]
                tags["apply"] = args.apply
            if method == "top_entropy":
                extra += ["--model.rl.top_entropy_quantile", str(args.top_entropy_quantile)]
                tags["top_entropy_quantile"] = args.top_entropy_quantile
            run_dir, wall = run_fit(config, extra, root)
            tag_results(run_dir, method=method, coef=coef, seed=seed, wall_s=round(wall, 1), **tags)
        return collect_run(run_dir, wall, method=method, coef=coef, seed=seed)

    from tqdm import tqdm

    with (
        ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool,
        tqdm(total=len(plan), desc="[compare] RL runs", unit="run", file=sys.stderr, dynamic_ncols=True) as bar,
    ):

        def tracked(job):
            try:
                return one(*job)
            finally:
                bar.update(1)  # its ETA: RL runs cost about the same, whatever the method

        runs = [r for r in pool.map(tracked, plan) if r is not None]

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
    summary = write_comparison_report(report, runs, settings, command, sft=sft, n_test=n_test)
    print(f"[compare] report: {report}", flush=True)
    print_summary(runs, summary)
    return summary


if __name__ == "__main__":
    main()
