"""Whether two run folders hold the same run: exported weights, emergence curve and results, compared exactly.

    python scripts/same_run.py runs/tiny/<before> runs/tiny/<after>

Prints the largest absolute weight difference over ``policy/*.safetensors`` (the same tensor names required), whether
``emergence.csv`` is identical apart from its wall-clock column, and whether ``results.json`` is identical; the last
line is ``RESULT max_abs_weight_diff=<x> emergence_identical=<bool> results_identical=<bool>``. Exit status 0 when
all three match exactly (a refactor that claims "no behaviour change" is checked with this on the main job), else 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WALL_CLOCK_COLUMNS = {"wall_s", "time", "timestamp"}
"""Columns of emergence.csv that record when, not what: left out of the comparison."""


def max_weight_difference(a: Path, b: Path) -> float:
    """``max |w_a - w_b|`` over every tensor of the two exported policies (inf where names or shapes differ)."""
    weights_a, weights_b = {}, {}
    for path in sorted((a / "policy").glob("*.safetensors")):
        weights_a.update(load_file(path))
    for path in sorted((b / "policy").glob("*.safetensors")):
        weights_b.update(load_file(path))
    if not weights_a or weights_a.keys() != weights_b.keys():
        return float("inf")
    worst = 0.0
    for name, value in weights_a.items():
        other = weights_b[name]
        if value.shape != other.shape:
            return float("inf")
        worst = max(worst, (value.double() - other.double()).abs().max().item() if value.numel() else 0.0)
    return worst


def emergence_rows(folder: Path) -> list[dict]:
    with open(folder / "emergence.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in WALL_CLOCK_COLUMNS} for row in csv.DictReader(f)]


def compare(a: Path, b: Path) -> tuple[float, bool, bool]:
    """``(max_abs_weight_diff, emergence_identical, results_identical)`` of two run folders."""
    results_a = json.loads((a / "results.json").read_text())
    results_b = json.loads((b / "results.json").read_text())
    return max_weight_difference(a, b), emergence_rows(a) == emergence_rows(b), results_a == results_b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    diff, emergence, results = compare(args.before, args.after)
    print(f"max |dw| over the exported policy: {diff:.3e}")
    print(f"emergence.csv identical (wall-clock columns aside): {emergence}")
    print(f"results.json identical: {results}")
    print(f"RESULT max_abs_weight_diff={diff:.3e} emergence_identical={emergence} results_identical={results}")
    return 0 if diff == 0 and emergence and results else 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
