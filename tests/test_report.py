"""``corrpo report``: summary.md and emergence.png of a run folder, checked against the run's own files.

The wandb history is read a second way here, independently of the report's ``wandb leet inspect``: a plain
parse of the transaction log's leveldb framing (32 KiB blocks, 7-byte chunk headers) and wandb's protobuf.
"""

import csv
import json
import re
import struct
import sys
from pathlib import Path

import pytest
import yaml

from corrpo.runs import report


def history_independently(path: Path) -> list[dict]:
    """Every history record of a ``run-*.wandb`` file (nested keys joined by ``.``, as wandb does)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or kind == 0:  # block trailer / zero padding
            pos += room
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record, MIDDLE/LAST extend
        if kind in (1, 4):  # FULL/LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def table(markdown: str, header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header line starts with ``header``, by first cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def check_inversion_and_accuracy(run_dir: Path, markdown: str) -> None:
    """The summary's inversion rows equal emergence.csv's start/boundary/end rows; its accuracies results.json's."""
    csv_rows = list(csv.DictReader((run_dir / "emergence.csv").open()))
    inversion = table(markdown, "| event |")
    for event in ("start", "boundary", "end"):
        row = next(r for r in reversed(csv_rows) if r["event"] == event)
        step, batches, phase, spearman, pearson, strength, n_tokens = inversion[event]
        assert (step, batches, phase, n_tokens) == (row["step"], row["batches"], row["phase"], row["n_tokens"])
        for cell, key in ((spearman, "spearman"), (pearson, "pearson"), (strength, "strength")):
            assert float(cell) == pytest.approx(float(row[key]), abs=5e-5)
    results = json.loads((run_dir / "results.json").read_text())
    accuracy = table(markdown, "| when |")
    for entry in results["test_accuracy"]:
        assert accuracy[entry["when"]][0] == str(entry["step"])
        assert float(accuracy[entry["when"]][1]) == pytest.approx(entry["accuracy"], abs=5e-5)
    assert f"Skipped updates: {results['skipped_updates']}" in markdown


def test_report_of_a_tiny_run(tiny_run):
    png, md = report.write_report(tiny_run)
    assert (png, md) == (tiny_run / "emergence.png", tiny_run / "summary.md")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = md.read_text()
    assert "![emergence curve](emergence.png)" in markdown
    check_inversion_and_accuracy(tiny_run, markdown)

    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    sft, rl = config["model"]["sft"]["steps"], config["model"]["rl"]["steps"]
    assert f"SFT: {sft} steps, then RL: {rl} steps" in markdown
    boundary = next(r for r in csv.DictReader((tiny_run / "emergence.csv").open()) if r["event"] == "boundary")
    assert f"SFT -> RL boundary at batch {boundary['batches']}" in markdown

    # the report's reader (wandb leet inspect) and the independent one agree on every history row
    log = report.find_wandb_log(tiny_run)
    history = history_independently(log)
    assert any("inversion/spearman" in row for row in history)
    assert report.wandb_history(log) == (history, None)
    rewards = [(row["trainer/global_step"], row["rl/reward"]) for row in history if "rl/reward" in row]
    assert report.reward_curve(history) == rewards
    if rewards:  # the shrunken run logs every 5 steps: its 3 RL steps may log no reward at all
        assert table(markdown, "| step | reward |") == {str(s): [f"{r:.4f}"] for s, r in report.downsample(rewards)}
    else:
        assert "Reward curve: not recorded" in markdown and "| step | reward |" not in markdown


def write_run(folder: Path, end: bool = True, results: bool = True) -> Path:
    """A hand-made run folder: emergence.csv (start, periodic, boundary[, end]), results.json, config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        (0, 0, "init", "start", 0.1),
        (50, 50, "sft", "periodic", -0.2),
        (100, 100, "sft", "boundary", -0.3),
        (120, 120, "rl", "periodic", -0.45),
    ] + ([(145, 145, "rl", "end", -0.5)] if end else [])
    lines = ["step,batches,phase,event,source,spearman,pearson,strength,n_tokens"]
    lines += [f"{s},{b},{p},{e},reference,{r},{r * 0.9},{-r},300" for s, b, p, e, r in rows]
    (folder / "emergence.csv").write_text("\n".join(lines) + "\n")
    config = {"trainer": {"log_every_n_steps": 1}, "model": {"sft": {"steps": 100}, "rl": {"steps": 45}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if results:
        accuracy = [
            {"when": "start", "step": 0, "accuracy": 0.0},
            {"when": "sft_end", "step": 100, "accuracy": 0.625},
            {"when": "end", "step": 145, "accuracy": 0.71875},
        ]
        (folder / "results.json").write_text(json.dumps({"test_accuracy": accuracy, "skipped_updates": 2}))
    return folder


def test_report_of_a_hand_made_run_without_wandb(tmp_path):
    run_dir = write_run(tmp_path / "run")
    _, md = report.write_report(run_dir)
    markdown = md.read_text()
    check_inversion_and_accuracy(run_dir, markdown)
    assert "SFT: 100 steps, then RL: 45 steps" in markdown and "boundary at batch 100" in markdown
    assert f"Reward curve: not recorded (no wandb run under `{run_dir / 'wandb'}`)" in markdown
    assert "Interrupted" not in markdown


def test_reward_table_of_an_offline_wandb_run(tmp_path):
    """Rewards logged by wandb itself (records spanning 32 KiB blocks) come back exactly, downsampled to 20 rows."""
    import wandb

    run_dir = write_run(tmp_path / "run")
    rewards = [(100 + i, round(0.3 + 0.01 * i + (i % 3) * 0.05, 6)) for i in range(45)]
    run = wandb.init(mode="offline", dir=str(run_dir), project="report-test", config={"big": "x" * 70_000})
    for step, reward in rewards:
        run.log({"reward": reward, "trainer/global_step": step, "note": "y" * 3000})
    run.finish()

    log = report.find_wandb_log(run_dir)
    history, problem = report.wandb_history(log)
    assert problem is None and history == history_independently(log)
    assert report.reward_curve(history) == rewards

    _, md = report.write_report(run_dir)
    markdown = md.read_text()
    shown = table(markdown, "| step | reward |")
    assert len(shown) == report.MAX_REWARD_ROWS
    assert shown == {str(s): [f"{r:.4f}"] for s, r in report.downsample(rewards)}
    assert {"100", "144"} <= shown.keys()
    assert "45 RL steps logged" in markdown

    torn = log.read_bytes()[: log.stat().st_size // 2]  # an interrupted run's log: the first rows and a note
    log.write_bytes(torn)
    history, problem = report.wandb_history(log)
    assert 0 < len(report.reward_curve(history)) < len(rewards) and "incomplete" in problem


def test_downsample_keeps_first_and_last():
    assert report.downsample(list(range(5))) == [0, 1, 2, 3, 4]
    picked = report.downsample(list(range(101)), limit=20)
    assert len(picked) == 20 and picked[0] == 0 and picked[-1] == 100 and picked == sorted(set(picked))


def test_interrupted_run_is_reported_as_such(tmp_path):
    run_dir = write_run(tmp_path / "run", end=False, results=False)
    _, md = report.write_report(run_dir)
    markdown = md.read_text()
    assert "**Interrupted run**" in markdown and "Not recorded (no results.json)." in markdown
    assert table(markdown, "| event |")["end"][0] == "not recorded"
    assert table(markdown, "| event |")["boundary"][:3] == ["100", "100", "sft"]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "emergence.csv"))):
        report.write_report(tmp_path)
    run_dir = write_run(tmp_path / "finished", results=False)  # an 'end' row but no results.json
    with pytest.raises(FileNotFoundError, match=re.escape(str(run_dir / "results.json"))):
        report.write_report(run_dir)


def test_corrpo_report_command(tmp_path, monkeypatch, capsys):
    from corrpo import cli

    run_dir = write_run(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["corrpo", "report", str(run_dir)])
    cli.main()
    assert capsys.readouterr().out.splitlines() == [str(run_dir / "emergence.png"), str(run_dir / "summary.md")]
    with pytest.raises(SystemExit) as exit_info:
        report.report_main([str(tmp_path / "nothing")])
    assert exit_info.value.code == 1 and "emergence.csv not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory) -> Path:
    """A shrunk run of configs/grpo-baseline.yaml: no inversion tracker, so no emergence.csv."""
    from conftest import REPO, TINY_FAST_ARGS

    from corrpo.cli import build_cli

    root = tmp_path_factory.mktemp("baseline") / "grpo-baseline"
    shrunk = [a for a in TINY_FAST_ARGS if not a.startswith("--trainer.callbacks.")]
    cli = build_cli(["fit", "--config", str(REPO / "configs" / "grpo-baseline.yaml"), *shrunk,
                     f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false"])  # fmt: skip
    return Path(cli.trainer.default_root_dir)


def test_a_run_without_a_tracker_is_reported_with_accuracy_and_rewards(baseline_run, capsys):
    assert not (baseline_run / "emergence.csv").exists()
    written = report.report_main([str(baseline_run)])
    assert written == [baseline_run / "summary.md"]
    markdown = written[0].read_text()
    assert "Method: grpo" in markdown and "Not measured: this run has no" in markdown
    assert set(table(markdown, "| when | step | accuracy |")) == {"start", "sft_end", "end"}
    assert "SFT -> RL boundary at batch 6 (config.yaml)" in markdown


def test_report_takes_a_parent_folder_and_latest(baseline_run, tmp_path, capsys, monkeypatch):
    parent = baseline_run.parent
    older = write_run(parent / "20000101-000000")  # a tracked run next to the baseline run
    written = report.report_main([str(parent)])
    assert baseline_run / "summary.md" in written and older / "summary.md" in written
    assert [r.path for r in report.report_targets(parent / "latest")] == [baseline_run]
    monkeypatch.chdir(parent.parent)
    assert [r.path.resolve() for r in report.report_targets("latest", default_root=parent.name)] == [baseline_run]
    with pytest.raises(SystemExit):
        report.report_main(["--help"])
    help_text = capsys.readouterr().out
    assert "parent folder" in help_text and "latest" in help_text and "``" not in help_text
