"""A shrunken configs/tiny.yaml through both phases: the run folder holds everything a run promises."""

import csv
import json

import pytest
import torch
from conftest import REPO

from corrpo.cli import build_cli
from corrpo.models.loading import load_policy


def test_run_folder_has_wandb_config_policy_results_and_curve(tiny_run):
    assert (tiny_run / "config.yaml").is_file()
    offline_runs = list((tiny_run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    model, tok = load_policy(str(tiny_run / "policy"))
    ids = torch.tensor([tok("3 +4 =", add_special_tokens=False)["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
    results = json.loads((tiny_run / "results.json").read_text())
    assert [r["when"] for r in results["test_accuracy"]] == ["start", "sft_end", "end"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["test_accuracy"])


def test_emergence_csv_spans_both_phases(tiny_run):
    rows = list(csv.DictReader((tiny_run / "emergence.csv").open()))
    events = [r["event"] for r in rows]
    assert events[0] == "start" and events[-1] == "end" and "boundary" in events
    assert {r["phase"] for r in rows} >= {"init", "sft", "rl"}
    # every 2 batches over 6 SFT + 3 RL batches: start, 2, 4, 6 (boundary), 8, end
    assert [int(r["batches"]) for r in rows] == [0, 2, 4, 6, 8, 9]
    assert all(int(r["n_tokens"]) > 0 for r in rows)
    assert all(-1.0 <= float(r["spearman"]) <= 1.0 for r in rows)


def test_fingerprint_a_checkpoint_prints_its_inversion(tiny_run, tmp_path, capsys):
    config = str(REPO / "configs" / "fingerprint.yaml")
    build_cli(
        [
            "validate",
            "--config",
            config,
            "--model.policy",
            str(tiny_run / "policy"),
            f"--trainer.default_root_dir={tmp_path}",
            "--data.n_probe=4",
            "--data.n_test=8",
        ]
    )
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("inversion/spearman=")]
    assert line, out
    rho = float(line[0].split()[0].split("=")[1])
    assert -1.0 <= rho <= 1.0
    (saved,) = tmp_path.rglob("fingerprint.json")
    row = json.loads(saved.read_text())
    assert row["event"] == "validate" and round(row["spearman"], 4) == rho and row["n_tokens"] > 0


def test_a_probe_set_larger_than_the_metric_buffer_warns_that_tokens_were_left_out(tiny_run, tmp_path):
    with pytest.warns(UserWarning, match="probe tokens did not fit the metric buffer"):
        build_cli(["validate", "--config", str(REPO / "configs" / "fingerprint.yaml"), "--model.policy",
                   str(tiny_run / "policy"), f"--trainer.default_root_dir={tmp_path}", "--data.n_probe=4",
                   "--data.n_test=8", "--trainer.callbacks.max_tokens=20"])  # fmt: skip
