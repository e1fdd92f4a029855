"""The wandb dashboard: completions table, phase-boundary marker and final figures, read back from the
offline run file with wandb's own reader (``wandb leet inspect``)."""

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import run_tiny

from corrpo.runs.report import find_wandb_log, wandb_history, wandb_records, wandb_summary


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    cli = run_tiny(root, "--model.rl.inversion.coef=0.1", "--trainer.log_every_n_steps=1")
    return Path(cli.trainer.default_root_dir), cli.model


def test_completions_table_has_every_reward_part_and_rho(dashboard_run):
    run, module = dashboard_run
    (table,) = run.rglob("completions_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == [
        "step", "prompt", "answer", "completion", "reward/accuracy", "reward/format", "reward/inversion", "reward",
        "advantage", "rho",
    ]  # fmt: skip
    assert len(content["data"]) == len(module.last_completions) == 2 * 4  # 2 prompts x G=4, under max_rows
    # the rows are the last RL batch's first completions, as the module kept them
    for logged, kept in zip(content["data"], module.last_completions, strict=False):
        assert logged[1:4] == [kept["prompt"], kept["answer"], kept["completion"]]
        assert logged[7] == pytest.approx(kept["reward"]) and logged[8] == pytest.approx(kept["advantage"])
        assert (logged[9] is None and math.isnan(kept["rho"])) or logged[9] == pytest.approx(kept["rho"])
        parts = kept["reward/accuracy"] + 0.2 * kept["reward/format"] + kept["reward/inversion"]
        assert kept["reward"] == pytest.approx(parts)


def test_summary_holds_the_boundary_and_the_final_figures(dashboard_run):
    run, module = dashboard_run
    summary = wandb_summary(find_wandb_log(run))
    rows = list(csv.DictReader((run / "emergence.csv").open()))
    by_event = {r["event"]: r for r in rows}
    assert summary["phase/boundary_step"] == int(by_event["boundary"]["step"])
    for event in ("start", "boundary", "end"):
        assert summary[f"final/inversion_spearman_{event}"] == pytest.approx(float(by_event[event]["spearman"]))
    for entry in module.eval_history:
        assert summary[f"final/test_accuracy_{entry['when']}"] == entry["accuracy"]
    assert summary["final/skipped_updates"] == 0


def test_inversion_and_phase_are_plotted_against_the_global_step(dashboard_run):
    run, _ = dashboard_run
    history, _ = wandb_history(find_wandb_log(run))
    inversion = [h for h in history if "inversion/spearman" in h]
    assert len(inversion) >= 4 and all("trainer/global_step" in h for h in inversion)
    # emergence.csv's x-axis rides along, so wandb can plot against it too
    rows = list(csv.DictReader((run / "emergence.csv").open()))
    assert sorted(h["batches"] for h in inversion) == sorted(float(r["batches"]) for r in rows)
    assert any("batches" in h and "sft/loss" in h for h in history)
    boundary = [h for h in history if h.get("phase/boundary") == 1]
    assert len(boundary) == 1 and boundary[0]["trainer/global_step"] == 6


def test_sections_emergence_chart_at_every_probe_and_group_tags(dashboard_run):
    run, _ = dashboard_run
    log = find_wandb_log(run)
    history, _ = wandb_history(log)
    keys = {k for h in history for k in h}
    assert {"sft/loss", "sft/lr", "sft/grad_norm", "rl/reward", "rl/kl", "rl/lr", "rl/rewards/accuracy/mean"} <= keys
    assert not {"loss", "lr", "grad_norm", "reward"} & keys  # SFT and RL no longer share a panel
    charts = [h for h in history if any(k.startswith("inversion/emergence_curve") for k in h)]
    probes = [h for h in history if "inversion/spearman" in h]
    assert len(charts) == len(probes)  # redrawn at every probe, not only at the end
    records, _ = wandb_records(log)
    (run_record,) = [r for r in records if r.get("type") == "run"] or [None]
    text = json.dumps(run_record)
    assert '"corrpo"' in text and "seed-0" in text  # group = method, tags = [method, seed]
