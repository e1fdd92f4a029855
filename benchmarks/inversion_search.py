"""Search for a tiny setting where the entropy-gradient inversion (rho < 0) emerges, with its anatomy.

Each SETTING is ``configs/tiny.yaml`` shortened to fit this CPU (BASE: 150 SFT steps, 16 RL steps of 8 prompts
x 8 samples, probe every 25 batches, ``InversionTracker.anatomy: true``) plus the overrides that vary one thing
that could flip the sign: untied unembedding, LayerNorm (GPT-2) or Gemma's (1 + w) norm instead of Qwen2's,
width / depth, SFT length (400, or 20 steps: the early-SFT dip), RL-zero from init, generated instead of
teacher-forced probes, longer arithmetic chains, the CorR-PO term on. Each (setting, seed) is one
``corrpo fit`` subprocess into ``<out>/<setting>/seed<k>``; a row already finished there is collected, not run again.
The seed sets the initial weights (``model.seed``), the sampling (``seed_everything``) and the batch order
(``data.seed``); the problems and the test set (``data.arithmetic.seed``) are the same for every row.

Per row it reports rho = Spearman(H, S) at the start, at SFT end (the boundary) and at RL end, and at each of
those points Spearman(H, factor) of the factors that carry the sign (1/rms, sin, |gamma w_y|, path gain,
|a_o|; see ``corrpo.inversion.anatomy``), the end test accuracy and the wall time. The command that reproduces
a row is printed with it. The ``bpe*`` settings start from ``configs/tiny-bpe.yaml`` instead: the same task as
English word problems with prose traces, a byte-level BPE tokenizer trained offline on them, a ~5M-parameter model
(and its narrow and shallow variants), 300 SFT steps. What this cannot show: anything beyond these tiny widths, this
synthetic task, and 16 RL steps.

Usage::

    python benchmarks/inversion_search.py [--settings base untied ...] [--seeds 0 1] [--out runs/inversion_search]
                                          [--markdown FILE] [--collect-only]

Last line: ``RESULT settings=<n> rows=<n> negative_sft_end=<n> negative_rl_end=<n> min_rho_end=<x>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BASE = [
    "--model.sft.steps=150",
    "--model.sft.warmup_steps=10",
    "--model.rl.steps=16",
    "--data.rl_batch_size=8",
    "--data.n_test=100",
    "--model.eval_batch_size=100",
    "--trainer.callbacks.every_n_steps=25",
    "--trainer.callbacks.anatomy=true",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
]
SETTINGS: dict[str, list[str]] = {
    "base": [],
    "untied": ["--model.tiny.tie_word_embeddings=false"],
    "gpt2_layernorm": ["--model.policy=tiny-gpt2"],
    "gemma_norm": ["--model.policy=tiny-gemma"],
    "generated_probes": ["--trainer.callbacks.source=generated"],
    "rl_zero": ["--model.sft.steps=0", "--model.sft.warmup_steps=0", "--model.rl.steps=32"],
    "sft_long": ["--model.sft.steps=400"],
    "sft_short": ["--model.sft.steps=20", "--model.sft.warmup_steps=5", "--model.rl.steps=32"],
    "long_chains": ["--data.arithmetic.min_ops=4", "--data.arithmetic.max_ops=6", "--model.sft.max_length=192"],
    "corrpo_term": ["--model.rl.inversion.coef=0.5"],
    "wide": ["--model.tiny.hidden_size=256", "--model.tiny.intermediate_size=768"],
    "deep": ["--model.tiny.num_hidden_layers=8"],
    # the natural-language setting (configs/tiny-bpe.yaml: word problems, byte-level BPE, ~5M parameters); its SFT
    # length stays the config's 300 steps (the tracker every 25 steps shows rho along the SFT length)
    "bpe": ["--model.sft.steps=300", "--model.sft.warmup_steps=20"],
    "bpe_narrow": [
        "--model.sft.steps=300",
        "--model.sft.warmup_steps=20",
        "--model.tiny.hidden_size=128",
        "--model.tiny.intermediate_size=384",
        "--model.tiny.num_attention_heads=4",
        "--model.tiny.num_key_value_heads=2",
    ],
    "bpe_shallow": ["--model.sft.steps=300", "--model.sft.warmup_steps=20", "--model.tiny.num_hidden_layers=2"],
}
CONFIGS = {
    "bpe": "configs/tiny-bpe.yaml",
    "bpe_narrow": "configs/tiny-bpe.yaml",
    "bpe_shallow": "configs/tiny-bpe.yaml",
}
"""The config a setting starts from (default ``configs/tiny.yaml``)."""
FACTORS = ("inv_rms", "sin", "w_norm", "path_gain", "o_act", "o_grad", "dz_dh")
POINTS = ("start", "boundary", "end")


def command(setting: str, seed: int, out: Path) -> list[str]:
    folder = out / setting / f"seed{seed}"
    return [
        sys.executable, "-m", "corrpo.cli", "fit", "--config", CONFIGS.get(setting, "configs/tiny.yaml"), *BASE,
        *SETTINGS[setting],
        f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}", "--data.arithmetic.seed=0",
        f"--trainer.default_root_dir={folder}",
    ]  # fmt: skip


def run_row(setting: str, seed: int, out: Path, collect_only: bool, recollect: bool = False) -> dict | None:
    folder = out / setting / f"seed{seed}"
    done = folder / "row.json"
    if done.is_file():
        row = json.loads(done.read_text())
        if recollect:  # re-read the run folder (e.g. after a new column), keeping the measured wall time
            row = collect(setting, seed, folder, row["wall_s"])
            done.write_text(json.dumps(row, indent=1))
        return row
    if collect_only:
        return None
    cmd = command(setting, seed, out)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"{setting} seed {seed}: rc {rc}, see {folder / 'log.txt'}", flush=True)
        return None
    row = collect(setting, seed, folder, wall)
    done.write_text(json.dumps(row, indent=1))
    return row


def collect(setting: str, seed: int, folder: Path, wall: float) -> dict:
    from corrpo.runs.run_folder import find_runs

    (run,) = find_runs([folder])
    frame = run.read_emergence()
    row = {"setting": setting, "seed": seed, "wall_s": round(wall, 1), "acc_end": run.test_accuracy("end")}
    for point in POINTS:
        hits = frame[frame["event"] == point]
        last = hits.iloc[-1] if len(hits) else None
        row[f"rho_{point}"] = float(last["spearman"]) if last is not None else math.nan
        for factor in FACTORS:
            key = f"anatomy_{factor}"
            value = float(last[key]) if last is not None and key in frame.columns else math.nan
            row[f"{factor}_{point}"] = value
        row[f"rho_O_{point}"] = o_rho(run, point)
    row.update({f"share_{f}_end": v for f, v in log_shares(run, "end").items()})
    row["rho_min"] = float(frame["spearman"].min())
    reproduce = command(setting, seed, Path("runs/inversion_search"))[3:]  # the fit arguments, a relative folder
    row["command"] = shlex.join(["python", "-m", "corrpo.cli", *reproduce])
    return row


def o_rho(run, event: str) -> float:
    """Spearman(H, S_O) of the last O projection alone (``o_grad * o_act``) from the run's per-token table."""
    from scipy.stats import spearmanr

    name = "boundary" if event == "boundary" else event
    if not run.anatomy_tokens(name).is_file():
        return math.nan
    table = run.read_anatomy_tokens(name)
    ok = table["o_grad"].notna()
    return float(spearmanr(table["entropy_bits"][ok], (table["o_grad"] * table["o_act"])[ok]).statistic)


CHAIN = ("inv_rms", "w_norm", "sin", "logit_slope", "path_gain", "o_act")
"""S_O = |g_t| |a_t| = logit_slope * inv_rms * w_norm * sin * path_gain * o_act (corrpo.inversion.anatomy)."""


def log_shares(run, event: str) -> dict[str, float]:
    """Each factor's share ``cov(log f, log S_O) / var(log S_O)`` of the spread of log S_O over the probe tokens.

    ``log S_O`` is the sum of the factors' logs, so the shares add up to 1: a factor with a strong rho but a narrow
    spread (small share) cannot set the sign of rho(H, S_O), however it moves with H.
    """
    import numpy as np

    if not run.anatomy_tokens(event).is_file():
        return {f: math.nan for f in CHAIN}
    table = run.read_anatomy_tokens(event)
    table = table[table["o_grad"].notna() & (table["dz_dh"] > 0)]
    logs = {f: np.log(table[f].to_numpy(dtype=float)) for f in CHAIN}
    total = sum(logs.values())
    return {f: float(np.cov(v, total)[0, 1] / total.var(ddof=1)) for f, v in logs.items()}


def fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


def markdown(rows: list[dict]) -> str:
    head = ["setting", "seed", "rho start", "rho SFT end", "rho RL end", "min rho", "rho_O SFT end", "rho_O RL end",
            "acc end", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r["setting"], str(r["seed"]), *(fmt(r[f"rho_{p}"]) for p in POINTS), fmt(r["rho_min"]),
                fmt(r["rho_O_boundary"]), fmt(r["rho_O_end"]), f"{r['acc_end']:.3f}", f"{r['wall_s']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "Spearman(H, factor) at SFT end / RL end:", ""]
    head = ["setting", "seed", *FACTORS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{fmt(r[f'{f}_boundary'])} / {fmt(r[f'{f}_end'])}" for f in FACTORS]
        lines.append("| " + " | ".join([r["setting"], str(r["seed"]), *cells]) + " |")
    lines += ["", "Share of each factor in the spread of log S_O over the probe tokens at RL end (sums to 1):", ""]
    head = ["setting", "seed", *CHAIN]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            "| " + " | ".join([r["setting"], str(r["seed"]), *(fmt(r[f"share_{f}_end"]) for f in CHAIN)]) + " |"
        )
    lines += ["", "Commands (one per row, from the repository root):", "", "```"]
    lines += [r["command"] for r in rows] + ["```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "inversion_search")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--collect-only", action="store_true", help="report finished rows, run nothing")
    parser.add_argument("--recollect", action="store_true", help="re-read finished rows from their run folders")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:  # every setting's first seed before any second seed: a cut-short search still covers all
        for setting in args.settings:
            row = run_row(setting, seed, args.out, args.collect_only, args.recollect)
            if row is not None:
                rows.append(row)
                print(f"{setting} seed {seed}: rho {fmt(row['rho_start'])} -> {fmt(row['rho_boundary'])} -> "
                      f"{fmt(row['rho_end'])} ({row['wall_s']:.0f} s)", flush=True)  # fmt: skip
    rows.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), r["seed"]))
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    ends = [r["rho_end"] for r in rows if not math.isnan(r["rho_end"])]
    print(
        f"RESULT settings={len({r['setting'] for r in rows})} rows={len(rows)} "
        f"negative_sft_end={sum(r['rho_boundary'] < 0 for r in rows)} negative_rl_end={sum(e < 0 for e in ends)} "
        f"min_rho_end={min(ends) if ends else math.nan:.3f}"
    )


if __name__ == "__main__":
    main()
