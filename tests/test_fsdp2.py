"""FSDP2 on 2 CPU processes (gloo), through Lightning's ModelParallelStrategy: the policy and the KL reference
sharded per decoder layer, SFT and RL steps (micro-batched) equal to a single-process run, the probe fingerprint
and the HF-generate test accuracy equal too, exact resume from a distributed checkpoint, and one exported Hugging
Face folder that gives the single-process logits.

Three ``python -m corrpo.cli fit`` subprocesses on the same data: a single-process run, a sharded run (which also
saves a distributed checkpoint after step 7, one RL step in) and a sharded run resumed from that checkpoint. RL
rollouts come from ``fake_generators.ScriptedSampling`` (scripted completions, no random numbers) so that RL losses
can be compared step by step although the ranks split the batch; its greedy generations (test accuracy) are the
policy's own HF ``generate``, here on the sharded model. The CorR-PO scoring pass (onepass strengths) and a k3 KL
to the reference are on; the RL reward is ``shaped_rewards:length``.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_FAST_ARGS, csv_metrics

CHECKPOINT = (
    '{"class_path": "callbacks.checkpoint.ResumableCheckpoint", "init_args": {"every_n_train_steps": 7, '
    '"save_top_k": -1, "filename": "mid-{step}", "auto_insert_metric_name": false}}'
)
ARGS = [
    *TINY_FAST_ARGS,
    "--data.rl_batch_size=4",  # 2 prompts (2 whole groups) per rank
    # The CorR-PO scoring pass runs in every RL step (on the gathered copy of the sharded policy) but gives no
    # response a bonus (completions are shorter than min_tokens): a response's rho is ill-conditioned in the
    # weights (a 1e-7 relative perturbation moves it by ~3e-4 on one process), so after SFT, where sharded and
    # single weights agree to round-off, a bonus would move the RL loss past 1e-6. Its exactness at equal weights
    # is the start probe's: the same score_tokens on the same gathered copy.
    "--model.rl.inversion.coef=0.1",
    "--model.rl.inversion.min_tokens=64",
    "--model.rl.beta=0.04",  # a KL reference, sharded like the policy
    "--model.generator=fake_generators.ScriptedSampling",
    # a reward with no wall-clock budget (math-verify's 0.5 s deadline can expire on a loaded machine, leaving a
    # prompt unscored in one run and not the other); the scripted completions' lengths differ within each group
    "--model.rl.rewards=[shaped_rewards:length]",
    "--model.rl.reward_weights=[1.0]",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--trainer.callbacks+=sharded_recorder.ShardRecorder",
    f"--trainer.callbacks+={CHECKPOINT}",
    '--trainer.logger+={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "csv"}}',
]
FSDP2 = [
    f"--config={REPO / 'configs' / 'scale' / 'fsdp2.yaml'}",  # the ready config: ModelParallelStrategy, 2 CPU ranks
    # micro-batched: each rank's 4 SFT rows as 3 + 1, its 8 RL rows as 3 + 3 + 2
    "--model.sft.micro_batch_size=3",
    "--model.rl.micro_batch_size=3",
]


def _start(root: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1", WANDB_MODE="offline")
    env.pop("LOCAL_RANK", None)
    command = [sys.executable, "-m", "corrpo.cli", "fit", "--config", str(REPO / "configs" / "tiny.yaml"), *ARGS]
    command += [f"--trainer.default_root_dir={root}", *extra]
    log = (root / "stderr.txt").open("w")
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True), root


def _finish(started: tuple[subprocess.Popen, Path]) -> Path:
    process, root = started
    assert process.wait(timeout=600) == 0, (root / "stderr.txt").read_text()[-4000:]
    (run,) = [p for p in root.iterdir() if p.is_dir() and p.name != "csv"]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # the single-process run and the sharded one side by side: both spend much of their time waiting
    single = _start(tmp_path_factory.mktemp("single"))
    sharded = _finish(_start(tmp_path_factory.mktemp("fsdp2"), *FSDP2))
    (mid,) = (sharded / "checkpoints").glob("mid-7*")
    resumed = _finish(_start(tmp_path_factory.mktemp("resumed"), *FSDP2, f"--ckpt_path={mid}"))
    return _finish(single), sharded, resumed, mid


def _emergence(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "emergence.csv").open()))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "policy" / "model.safetensors")


def test_each_rank_holds_half_of_the_policy_and_of_the_reference(runs):
    _, sharded, _, mid = runs
    rows = [json.loads((sharded / f"shards-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["policy_sharded"] and r["reference_sharded"] for r in rows)
    full = rows[0]["full_numel"]
    assert rows[0]["local_numel"] + rows[1]["local_numel"] == full
    assert all(r["local_numel"] <= full / 2 + 1024 for r in rows)  # FSDP2 pads each parameter's last shard
    assert sorted(p.name for p in mid.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank


def test_sft_and_rl_losses_equal_the_single_process_run(runs):
    single, sharded, _, _ = runs
    m_single, m_sharded = csv_metrics(single), csv_metrics(sharded)
    sft = [s for s, row in m_single.items() if "sft/loss" in row and row.get("phase") == 0.0]
    rl = [s for s, row in m_single.items() if "rl/loss" in row]
    assert len(sft) == 6 and len(rl) == 3
    for step in sft:
        assert m_sharded[step]["sft/loss"] == pytest.approx(m_single[step]["sft/loss"], rel=1e-6), step
        assert m_sharded[step]["sft/grad_norm"] == pytest.approx(m_single[step]["sft/grad_norm"], rel=1e-5), step
    for step in rl:
        for key in ("rl/loss", "rl/reward", "rl/entropy", "rl/inversion/rollout_nan_frac"):
            assert m_sharded[step][key] == pytest.approx(m_single[step][key], rel=1e-6), (step, key)
        # k3 KL is exp(d) - d - 1 of near-equal log-probs (~1e-6 here): fp32 cancellation leaves ~1e-9 absolute
        assert m_sharded[step]["rl/kl"] == pytest.approx(m_single[step]["rl/kl"], rel=1e-6, abs=1e-8), step
        assert m_sharded[step]["rl/grad_norm"] == pytest.approx(m_single[step]["rl/grad_norm"], rel=1e-5), step
    assert json.loads((sharded / "results.json").read_text())["skipped_updates"] == 0


def test_probe_fingerprint_and_test_accuracy_equal_the_single_process_run(runs):
    single, sharded, _, _ = runs
    rows_single, rows_sharded = _emergence(single), _emergence(sharded)
    assert [(r["step"], r["event"]) for r in rows_sharded] == [(r["step"], r["event"]) for r in rows_single]
    start_single, start_sharded = rows_single[0], rows_sharded[0]
    assert start_sharded["event"] == "start" and start_sharded["n_tokens"] == start_single["n_tokens"]
    assert float(start_sharded["spearman"]) == pytest.approx(float(start_single["spearman"]), abs=1e-12)
    assert float(start_sharded["pearson"]) == pytest.approx(float(start_single["pearson"]), abs=1e-12)
    # greedy HF generate on the sharded policy (synced_gpus), each rank half the test set: at the start (same
    # weights) every completion is the single-process one, token for token
    generated = [_greedy_completions(run, "start") for run in (single, sharded)]
    assert len(generated[0]) == 16 and generated[1] == generated[0]
    acc = [{e["when"]: e["accuracy"] for e in json.loads((r / "results.json").read_text())["test_accuracy"]}
           for r in (single, sharded)]  # fmt: skip
    assert acc[1]["start"] == acc[0]["start"] and acc[1]["sft_end"] == acc[0]["sft_end"]


def _greedy_completions(run: Path, when: str) -> dict[str, str]:
    """prompt -> greedy completion of the test split at ``when``, from every rank's eval_generations file."""
    rows = [json.loads(line) for path in run.glob("eval_generations*.jsonl") for line in path.read_text().splitlines()]
    return {r["prompt"]: r["completion"] for r in rows if r["when"] == when and r["split"] == "test"}


def test_resuming_a_distributed_checkpoint_gives_the_uninterrupted_weights(runs):
    _, sharded, resumed, _ = runs
    whole, continued = _weights(sharded), _weights(resumed)
    assert whole.keys() == continued.keys()
    assert all(torch.equal(whole[k], continued[k]) for k in whole)
    m_whole, m_continued = csv_metrics(sharded), csv_metrics(resumed)
    rl = [s for s, row in m_continued.items() if "rl/loss" in row]
    assert len(rl) == 2 and all(m_continued[s]["rl/loss"] == m_whole[s]["rl/loss"] for s in rl)
    after = [r for r in _emergence(sharded) if int(r["batches"]) > 7]
    assert after and [(r["event"], r["spearman"]) for r in after] == [
        (r["event"], r["spearman"]) for r in _emergence(resumed) if int(r["batches"]) > 7
    ]


def test_the_exported_policy_is_one_folder_that_gives_the_single_process_logits(runs):
    from transformers import AutoModelForCausalLM

    single, sharded, _, _ = runs
    assert _weights(sharded).keys() == _weights(single).keys()  # one copy of the tied embeddings, as save_pretrained
    models = [AutoModelForCausalLM.from_pretrained(run / "policy") for run in (single, sharded)]
    ids = torch.randint(5, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [model(input_ids=ids).logits for model in models]
    # 9 steps of AdamW from the same start: the weights agree to float round-off
    assert torch.allclose(logits[1], logits[0], rtol=1e-4, atol=1e-4 * logits[0].abs().max().item())
