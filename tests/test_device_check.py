"""``benchmarks/device_check.py --cpu``: the GPU day's script runs end to end on tiny shapes and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_runs_on_the_cpu_and_writes_one_json(tmp_path):
    out = tmp_path / "device_check.json"
    command = [sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--cpu", "--out", str(out),
               "--model-dir", str(tmp_path / "model")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT device=cpu sections_ok=5/7")
    report = json.loads(out.read_text())
    for T in ("T12", "T24"):  # onepass is the loop's value, exactly
        assert report["strength"][T]["max_relative_error"] < 1e-4
    for step in ("sft", "grpo", "corrpo_qkvo", "corrpo_qvo"):
        assert report["steps"][step]["tokens_per_s"] > 0 and report["steps"][step]["peak_bytes"] > 0
    assert report["generate"]["new_tokens"] == 16
    assert "skipped" in report["vllm"] or "tokens_per_s" in report["vllm"]
    for T in ("T32", "T64"):  # long traces: both K solvers exact against the loop
        row = report["long_traces"][T]
        assert row["eigh_max_rel_err_vs_loop"] < 1e-4 and row["batched_max_rel_err_vs_loop"] < 1e-4
    assert report["batched_route"]["max_rel_diff"] < 1e-4
    assert "sharded_memory.py" in report["sharded"]["skipped"]  # a 2-GPU check; the CPU side is its own script
