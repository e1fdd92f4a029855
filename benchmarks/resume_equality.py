"""Exact resume, measured: N steps in one go against N/2 steps, stop, ``--ckpt_path last``, N/2 more.

Runs the shrunken tiny config (both phases; the CorR-PO term on so RL moves the weights) three times in
this process and prints the largest weight difference and whether emergence.csv is identical. Usage::

    python benchmarks/resume_equality.py [--sft 3] [--rl 5] [--stop 4]

The last line is ``RESULT max_abs_weight_diff=<float> emergence_identical=<bool>``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from tiny_runs import run_tiny  # noqa: E402

from corrpo.runs.run_folder import RunFolder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=int, default=3)
    parser.add_argument("--rl", type=int, default=5)
    parser.add_argument("--stop", type=int, default=4, help="steps before the stop (inside RL when > --sft)")
    args = parser.parse_args()
    steps = [f"--model.sft.steps={args.sft}", f"--model.rl.steps={args.rl}", "--model.rl.inversion.coef=0.5",
             "--model.rl.lr=1e-3"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        whole = run_tiny(Path(tmp) / "whole", *steps)
        run_tiny(Path(tmp) / "split", *steps, f"--trainer.max_steps={args.stop}")
        split = run_tiny(Path(tmp) / "split", *steps, "--ckpt_path=last")
        a, b = whole.model.policy.state_dict(), split.model.policy.state_dict()
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        csv_a = RunFolder(whole.trainer.default_root_dir).emergence.read_text()
        csv_b = RunFolder(split.trainer.default_root_dir).emergence.read_text()
    print(f"steps: {args.sft} SFT + {args.rl} RL; stopped after {args.stop}, resumed with --ckpt_path last")
    print(f"{'quantity':32s} value")
    print(f"{'max |w_whole - w_split|':32s} {diff:.3e}")
    print(f"{'emergence.csv rows':32s} {len(csv_a.splitlines()) - 1}")
    print(f"{'emergence.csv identical':32s} {csv_a == csv_b}")
    print(f"RESULT max_abs_weight_diff={diff:.3e} emergence_identical={csv_a == csv_b}")


if __name__ == "__main__":
    main()
