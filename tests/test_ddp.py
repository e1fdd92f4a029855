"""Two-process DDP on the CPU (gloo): the tiny config through both phases, groups kept on one rank, and the
SFT phase, the InversionStrength values and the accuracy equal to a single-process run on the same data (the DDP
run micro-batched, the single one not).

Both runs are subprocesses of ``python -m corrpo.cli fit`` with the same arguments; the DDP one adds
``--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu`` (Lightning re-launches the
command for rank 1). RL sampling draws different random numbers when the batch is split, so RL-phase
values match in distribution only; SFT is deterministic and must match step by step.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_FAST_ARGS, csv_metrics

G = 4
ARGS = [
    *TINY_FAST_ARGS,
    "--data.rl_batch_size=4",  # 2 prompts (2 whole groups) per rank
    "--model.rl.top_entropy_quantile=0.5",  # its threshold gathers every rank's token entropies
    "--model.rl.inversion.coef=0.1",  # rollout_spearman pools every rank's responses
    "--model.rl.inversion.min_tokens=12",  # some responses are too short to count
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--trainer.callbacks+=ddp_recorder.GroupRecorder",
    '--trainer.logger+={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "csv"}}',
]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
# The DDP run also micro-batches (each rank's 4 SFT rows as 3 + 1, its 8 RL rows as 3 + 3 + 2): the global token
# count and the gathered entropy threshold span every chunk of every rank, so SFT still equals the single run.
MICRO = ["--model.sft.micro_batch_size=3", "--model.rl.micro_batch_size=3"]


def _fit(root: Path, *extra: str) -> Path:
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("LOCAL_RANK", None)
    command = [sys.executable, "-m", "corrpo.cli", "fit", "--config", str(REPO / "configs" / "tiny.yaml"), *ARGS]
    command += [f"--trainer.default_root_dir={root}", *extra]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (run,) = [p for p in root.iterdir() if p.is_dir() and p.name != "csv"]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = _fit(tmp_path_factory.mktemp("single"))
    ddp = _fit(tmp_path_factory.mktemp("ddp"), *DDP, *MICRO)
    return single, ddp


def _steps(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"steps-rank{rank}.jsonl").read_text().splitlines()]


def test_both_ranks_ran_every_step_of_both_phases(runs):
    single, ddp = runs
    for rank in (0, 1):
        rows = _steps(ddp, rank)
        assert [r["step"] for r in rows] == list(range(9))
        assert [r["phase"] for r in rows] == ["sft"] * 6 + ["rl"] * 3
    assert json.loads((ddp / "results.json").read_text())["skipped_updates"] == 0


def test_ranks_split_each_step_into_whole_prompts_and_keep_every_group_on_one_rank(runs):
    single, ddp = runs
    whole = _steps(single, 0)
    shares = [_steps(ddp, 0), _steps(ddp, 1)]
    for step, batch in enumerate(whole):
        parts = [shares[0][step]["prompts"], shares[1][step]["prompts"]]
        assert parts[0] + parts[1] == batch["prompts"], f"step {step}: the ranks' shares are not the whole batch"
        assert len(parts[0]) == len(parts[1])
        if batch["phase"] == "rl":
            for rank in (0, 1):
                sampled = shares[rank][step]["completion_prompts"]
                # prompt-major: each of this rank's prompts G times in a row, and nothing else
                assert sampled == [p for p in parts[rank] for _ in range(G)]


def test_sft_losses_and_inversion_values_equal_the_single_process_run(runs):
    single, ddp = runs
    m_single, m_ddp = csv_metrics(single), csv_metrics(ddp)
    sft_steps = [s for s in m_single if "sft/loss" in m_single[s] and m_single[s].get("phase") == 0.0]
    assert len(sft_steps) >= 5
    for step in sft_steps:
        assert m_ddp[step]["sft/loss"] == pytest.approx(m_single[step]["sft/loss"], rel=1e-5), step
        assert m_ddp[step]["sft/grad_norm"] == pytest.approx(m_single[step]["sft/grad_norm"], rel=1e-4), step
    rows_single = list(csv.DictReader((single / "emergence.csv").open()))
    rows_ddp = list(csv.DictReader((ddp / "emergence.csv").open()))
    assert [(r["step"], r["event"]) for r in rows_ddp] == [(r["step"], r["event"]) for r in rows_single]
    compared = [r for r in rows_single if r["phase"] in ("init", "sft")]  # up to and including the boundary
    assert any(r["event"] == "boundary" for r in compared)
    # Same weights at the start: the metric, fed half the probe tokens on each rank and gathered, must give
    # the single-process value exactly.
    assert rows_ddp[0]["event"] == "start"
    assert float(rows_ddp[0]["spearman"]) == pytest.approx(float(rows_single[0]["spearman"]), abs=1e-12)
    assert float(rows_ddp[0]["pearson"]) == pytest.approx(float(rows_single[0]["pearson"]), abs=1e-12)
    # After SFT steps the weights agree to float round-off (~1e-7), which can swap a few near-tied ranks among
    # the 226 probe tokens: one adjacent swap moves rho by ~1e-4.
    for a, b in zip(compared, rows_ddp, strict=False):
        assert int(b["n_tokens"]) == int(a["n_tokens"])  # every probe token, gathered from both ranks
        assert float(b["spearman"]) == pytest.approx(float(a["spearman"]), abs=1e-3)
        assert float(b["pearson"]) == pytest.approx(float(a["pearson"]), abs=1e-4)


def test_accuracy_before_rl_equals_the_single_process_run(runs):
    single, ddp = runs
    acc = [
        {e["when"]: e["accuracy"] for e in json.loads((run / "results.json").read_text())["test_accuracy"]}
        for run in (single, ddp)
    ]
    assert acc[1]["start"] == acc[0]["start"] and acc[1]["sft_end"] == acc[0]["sft_end"]
    assert set(acc[1]) == {"start", "sft_end", "end"}


def test_each_rank_decodes_its_own_half_of_the_test_set_and_the_counts_add_up(runs):
    single, ddp = runs
    decoded = [
        [json.loads(line)["decoded"] for line in (ddp / f"eval-rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    ]
    (whole,) = {json.loads(line)["decoded"] for line in (single / "eval-rank0.jsonl").read_text().splitlines()}
    assert len(decoded[0]) == len(decoded[1]) == 3  # start, sft_end, end
    assert all(a + b == whole and abs(a - b) <= 1 for a, b in zip(*decoded, strict=True))
    scored = [
        [e["scored"] for e in json.loads((run / "results.json").read_text())["test_accuracy"]] for run in (single, ddp)
    ]
    assert scored[0] == scored[1] and scored[0][0] > 0


def test_rollout_spearman_is_the_mean_over_both_ranks_responses_with_a_bonus(runs):
    _, ddp = runs
    metrics = csv_metrics(ddp)
    rl_steps = [pair for pair in zip(_steps(ddp, 0), _steps(ddp, 1), strict=True) if pair[0]["phase"] == "rl"]
    assert len(rl_steps) == 3
    for pair in rl_steps:
        # a response has a bonus exactly when its rho counts (min_tokens 12 leaves some out)
        valid = [rho for row in pair for rho, bonus in zip(row["rho"], row["bonus"], strict=True) if bonus != 0]
        assert 0 < len(valid) < 16
        logged = metrics[pair[0]["step"]]["rl/inversion/rollout_spearman"]
        assert logged == pytest.approx(sum(valid) / len(valid), abs=1e-6)


def test_pooled_mean_weighs_every_value_not_every_rank():
    import torch

    from corrpo.training.collectives import SINGLE_PROCESS, Collectives
    from corrpo.training.grpo import pooled_mean

    class TwoRanks(Collectives):  # the other rank holds three values summing to 3.0
        world_size = 2

        def sum_floats(self, *values, device="cpu"):
            return (torch.tensor(values, dtype=torch.float64) + torch.tensor([3.0, 3.0], dtype=torch.float64)).tolist()

    assert pooled_mean(torch.tensor([0.0]), TwoRanks()).item() == pytest.approx(3.0 / 4)  # mean of means: 0.5
    assert pooled_mean(torch.tensor([0.2, 0.4]), SINGLE_PROCESS).item() == pytest.approx(0.3)
    assert math.isnan(pooled_mean(torch.tensor([]), SINGLE_PROCESS).item())
