"""``corrpo report``: summary.md and emergence.png of a run folder, checked against the run's own files.

The wandb history is read a second way here, independently of the report's ``wandb leet inspect``: a plain
parse of the transaction log's leveldb framing (32 KiB blocks, 7-byte chunk headers) and wandb's protobuf.
"""

import csv
import json
import math
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
    written = report.write_report(tiny_run)
    png, md = written[0], written[-1]
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
        assert "- `reward.png` not drawn: no RL step was logged (`trainer.log_every_n_steps` = 5)." in markdown
        assert tiny_run / "reward.png" not in written
    assert tiny_run / "accuracy.png" in written and "](accuracy.png)" in markdown


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
    md = report.write_report(run_dir)[-1]
    markdown = md.read_text()
    check_inversion_and_accuracy(run_dir, markdown)
    assert "SFT: 100 steps, then RL: 45 steps" in markdown and "boundary at batch 100" in markdown
    assert f"Reward curve: not recorded (no wandb run under `{run_dir / 'wandb'}`, no metrics.csv)" in markdown
    assert f"- `reward.png` not drawn: no logged metrics (no wandb run under `{run_dir / 'wandb'}`" in markdown
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

    written = report.write_report(run_dir)
    markdown = written[-1].read_text()
    shown = table(markdown, "| step | reward |")
    assert len(shown) == report.MAX_REWARD_ROWS
    assert shown == {str(s): [f"{r:.4f}"] for s, r in report.downsample(rewards)}
    assert {"100", "144"} <= shown.keys()
    assert "45 RL steps logged" in markdown
    assert run_dir / "reward.png" in written and "](reward.png)" in markdown  # an old run's `reward` key drawn too

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
    md = report.write_report(run_dir)[-1]
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
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(run_dir / name) for name in ("emergence.png", "accuracy.png", "summary.md")]
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
                     f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                     "--trainer.log_every_n_steps=1"])  # fmt: skip  # every RL step logged: the curves' data
    return Path(cli.trainer.default_root_dir)


def test_a_run_without_a_tracker_is_reported_with_accuracy_and_rewards(baseline_run, capsys):
    assert not (baseline_run / "emergence.csv").exists()
    written = report.report_main([str(baseline_run)])
    names = ("reward.png", "accuracy.png", "completion_length.png", "summary.md")
    assert written == [baseline_run / name for name in names]
    markdown = written[-1].read_text()
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


PNG = b"\x89PNG\r\n\x1a\n"


def plotted(figure) -> dict[str, list[tuple[float, float]]]:
    """Every line a figure draws, by label: its ``(x, y)`` points (the data, not the pixels)."""
    import matplotlib.pyplot as plt

    lines = {line.get_label(): [tuple(p) for p in line.get_xydata().tolist()] for a in figure.axes for line in a.lines}
    plt.close(figure)
    return lines


def logged(history: list[dict], key: str) -> list[tuple[int, float]]:
    """``(trainer/global_step, value)`` of every history row that logged ``key`` as a finite number."""
    return [
        (row["trainer/global_step"], float(row[key]))
        for row in history
        if isinstance(row.get(key), int | float) and math.isfinite(row[key])
    ]


def test_the_curve_figures_draw_the_logged_metrics(baseline_run):
    """reward.png, accuracy.png and completion_length.png of a real shrunk run (3 RL steps of 2 updates each,
    every step logged): each drawn line equals the metric as logged (read by the independent wandb parser) or
    as results.json holds it, and the files are written."""
    from corrpo.runs.curves import training_curves
    from corrpo.runs.plotting import curves_figure

    history = history_independently(report.find_wandb_log(baseline_run))
    results = json.loads((baseline_run / "results.json").read_text())
    curves = {c.name: c for c in training_curves(history, results, no_rl="unused")}
    assert list(curves) == ["reward", "accuracy", "completion_length"]
    assert all(c.missing is None for c in curves.values())

    reward = plotted(curves_figure(curves["reward"], boundary_step=6))
    assert reward["reward (weighted sum)"] == logged(history, "rl/reward") and len(reward["reward (weighted sum)"]) == 3
    for name in ("accuracy", "format"):
        assert reward[f"rewards/{name}/mean"] == logged(history, f"rl/rewards/{name}/mean")
    assert [x for x, _ in reward["SFT -> RL"]] == [6, 6]

    accuracy = plotted(curves_figure(curves["accuracy"]))
    assert accuracy["test (greedy)"] == [(e["step"], e["accuracy"]) for e in results["test_accuracy"]]
    assert accuracy["RL samples: rewards/accuracy/mean"] == logged(history, "rl/rewards/accuracy/mean")

    length = plotted(curves_figure(curves["completion_length"]))
    assert length["mean length (tokens)"] == logged(history, "rl/completions/mean_length")
    assert length["clipped ratio (hit max_new_tokens)"] == logged(history, "rl/completions/clipped_ratio")

    markdown = report.write_report(baseline_run)[-1].read_text()
    for name in curves:
        assert (baseline_run / f"{name}.png").read_bytes().startswith(PNG), name
        assert (baseline_run / f"{name}.png").stat().st_size > 5000 and f"]({name}.png)" in markdown


def test_an_sft_only_run_says_why_it_has_no_rl_curves(tmp_path):
    run_dir = write_run(tmp_path / "sft-only")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"sft": {"steps": 100}, "rl": {"steps": 0}}}))
    written = report.write_report(run_dir)
    assert [p.name for p in written] == ["emergence.png", "accuracy.png", "summary.md"]
    markdown = written[-1].read_text()
    for name in ("reward", "completion_length"):
        assert f"- `{name}.png` not drawn: SFT only (`model.rl.steps` = 0)." in markdown
        assert not (run_dir / f"{name}.png").exists()


def test_a_run_without_evaluations_says_why_it_has_no_accuracy_curve(tmp_path):
    run_dir = write_run(tmp_path / "no-eval")
    (run_dir / "results.json").write_text(json.dumps({"test_accuracy": [], "skipped_updates": 0}))
    written = report.write_report(run_dir)
    assert [p.name for p in written] == ["emergence.png", "summary.md"]
    assert "- `accuracy.png` not drawn: no evaluation was recorded (no results.json `test_accuracy`" in (
        written[-1].read_text()
    )


def test_a_csv_logger_run_gets_its_curves_from_metrics_csv(tmp_path):
    """Without a wandb run, the scalars of a Lightning CSVLogger's metrics.csv in the run folder are drawn."""
    from lightning.pytorch.loggers import CSVLogger

    from corrpo.runs.curves import training_curves
    from corrpo.runs.plotting import curves_figure

    run_dir = write_run(tmp_path / "csv-run")
    logger = CSVLogger(save_dir=run_dir, name="csv")
    logger.log_metrics({"sft/loss": 1.5}, step=50)  # an SFT row: no RL key, no point
    rows = [(100 + i, 0.1 * i, 20.0 + 3 * i) for i in range(5)]
    for step, reward, length in rows:
        logger.log_metrics({"rl/reward": reward, "rl/completions/mean_length": length}, step=step)
    logger.save()

    written = report.write_report(run_dir)
    names = ["emergence.png", "reward.png", "accuracy.png", "completion_length.png", "summary.md"]
    assert [p.name for p in written] == names
    metrics = report.logged_metrics(run_dir)
    assert metrics.source == "`csv/version_0/metrics.csv`" and metrics.source in written[-1].read_text()
    curves = {c.name: c for c in training_curves(metrics.rows, None, no_rl="unused")}
    assert plotted(curves_figure(curves["reward"]))["reward (weighted sum)"] == [(s, r) for s, r, _ in rows]
    assert plotted(curves_figure(curves["completion_length"]))["mean length (tokens)"] == [(s, n) for s, _, n in rows]


def test_logged_series_keeps_a_repeated_steps_later_value_and_drops_non_numbers():
    from corrpo.runs.curves import STEP_KEY, CurveSet, logged_series
    from corrpo.runs.plotting import curves_figure

    rows = [{STEP_KEY: 5, "k": 1.0}, {STEP_KEY: 3, "k": 2}, {STEP_KEY: 5, "k": 4.0}, {STEP_KEY: 6, "k": math.nan},
            {STEP_KEY: 7, "k": "x"}, {STEP_KEY: 8, "k": True}, {STEP_KEY: 9}]  # fmt: skip
    assert logged_series(rows, "k") == [(3, 2.0), (5, 4.0)]
    with pytest.raises(ValueError, match="reward: nothing to draw"):
        curves_figure(CurveSet("reward", "t", "y", missing="SFT only"))


SECTIONS = "rl|sft|eval|inversion|phase|rewards|completions|clip_ratio"
METRIC_NAME = re.compile(rf"(?<![\w/.-])(?:{SECTIONS})/[\w<>@|/.-]*[\w>]")
NOT_IN_A_GRPO_RUN = {
    # logged only with the CorR-PO term (rl.inversion.coef > 0) or Clip-Cov / KL-Cov: not in the baseline run
    "rl/inversion/rollout_spearman", "rl/inversion/rollout_pearson", "rl/inversion/rollout_nan_frac",
    "rl/rewards/inversion/mean", "rl/rewards/inversion/std", "rl/clip_ratio/cov_selected",
}  # fmt: skip


def test_the_tutorials_name_only_metrics_a_run_logs(baseline_run, tiny_run):
    """Every metric named in docs/tutorials (``rl/``, ``sft/``, ``eval/``, ``inversion/``, ``phase/``; and a bare
    ``rewards/`` / ``completions/`` / ``clip_ratio/``, which a run never logs outside ``rl/``) is one that the
    GRPO baseline run or the tracked tiny run logs, in its history or summary (``a|b`` alternatives expanded,
    ``<name>`` placeholders any one path part; a reward's own name stands for any), or a CorR-PO / Clip-Cov
    key, or a ``model.eval`` file's ``eval/<set>/...`` key."""
    from conftest import REPO

    logged_keys = set()
    for run in (baseline_run, tiny_run):
        log = report.find_wandb_log(run)
        logged_keys |= {key.split(".")[0] for row in history_independently(log) for key in row}
        logged_keys |= set(report.wandb_summary(log))
    assert {"rl/reward", "rl/completions/mean_length", "sft/loss", "eval/test_accuracy"} <= logged_keys
    assert {"inversion/spearman", "inversion/tokens_end", "phase/boundary_step"} <= logged_keys
    unknown = []
    for doc in sorted((REPO / "docs" / "tutorials").glob("*.md")):
        for found in METRIC_NAME.findall(doc.read_text()):
            head, _, last = found.rpartition("/")
            for name in [f"{head}/{alt}" for alt in last.split("|")] if "|" in last else [found]:
                known = NOT_IN_A_GRPO_RUN
                if any(k == name or k.startswith(name + "/") for k in known) or name.startswith("eval/<set>/"):
                    continue
                name = re.sub(r"^rl/rewards/[^/]+/", "rl/rewards/<name>/", name)
                pattern = re.compile(re.sub(r"<[^>]+>", "[^/]+", re.escape(name)))
                if not any(pattern.fullmatch(k) or k.startswith(name + "/") for k in logged_keys):
                    unknown.append(f"{doc.name}: {found}")
    assert not unknown, unknown
