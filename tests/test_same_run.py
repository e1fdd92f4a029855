"""scripts/same_run.py: two run folders compared exactly (weights, emergence curve, results)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "same_run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("same_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_folder(root: Path, weight: float, spearman: float, wall_s: float, accuracy: float = 0.5) -> Path:
    (root / "policy").mkdir(parents=True)
    save_file({"w": torch.full((2, 3), weight)}, str(root / "policy" / "model.safetensors"))
    (root / "emergence.csv").write_text(f"step,spearman,wall_s\n0,{spearman},{wall_s}\n")
    (root / "results.json").write_text(json.dumps({"test_accuracy": [{"when": "end", "accuracy": accuracy}]}))
    return root


def test_the_same_run_is_reported_the_same_and_each_difference_is_found(tmp_path):
    same_run = load_script()
    a = run_folder(tmp_path / "a", 1.0, 0.25, wall_s=3.0)
    b = run_folder(tmp_path / "b", 1.0, 0.25, wall_s=9.0)  # another wall clock, the same run
    assert same_run.compare(a, b) == (0.0, True, True) and same_run.main([str(a), str(b)]) == 0
    c = run_folder(tmp_path / "c", 1.0 + 2**-10, 0.5, wall_s=3.0, accuracy=0.75)
    assert same_run.compare(a, c) == (2**-10, False, False) and same_run.main([str(a), str(c)]) == 1
