"""CorR-PO through the real CLI: lambda = 0 is exactly the GRPO baseline; lambda > 0 changes training."""

import csv

import pytest
import torch
from conftest import run_tiny

from corrpo.models.loading import load_policy

# a reward that differs within groups, so GRPO's advantages are non-zero and RL moves the weights
SHAPED = ("--model.rl.rewards=[accuracy, format, shaped_rewards:length]", "--model.rl.reward_weights=[1.0, 0.2, 1.0]")


def final_weights(cli) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}


@pytest.fixture(scope="module")
def grpo_weights(tmp_path_factory):
    return final_weights(run_tiny(tmp_path_factory.mktemp("grpo"), "--trainer.logger=false", *SHAPED))


def test_lambda_zero_is_exactly_the_grpo_baseline(grpo_weights, tmp_path):
    # the inversion options differ, but with coef 0 nothing of them may touch the run
    cli = run_tiny(
        tmp_path,
        "--trainer.logger=false",
        "--model.rl.inversion.coef=0",
        "--model.rl.inversion.min_tokens=2",
        "--model.rl.inversion.center=true",
        *SHAPED,
    )
    weights = final_weights(cli)
    assert all(torch.equal(weights[k], grpo_weights[k]) for k in grpo_weights)
    # ... and the comparison can fail: GRPO's RL steps did move the weights away from the SFT-only policy
    sft_only = final_weights(run_tiny(tmp_path / "sft", "--trainer.logger=false", "--model.rl.steps=0"))
    assert any(not torch.equal(sft_only[k], grpo_weights[k]) for k in grpo_weights)


def test_lambda_positive_scores_rollouts_and_changes_the_update(grpo_weights, tmp_path):
    cli = run_tiny(
        tmp_path,
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.log_every_n_steps=1",
        "--model.rl.inversion.coef=1.0",
        "--model.rl.inversion.min_tokens=2",
        *SHAPED,
    )
    weights = final_weights(cli)
    assert any(not torch.equal(weights[k], grpo_weights[k]) for k in grpo_weights)
    metrics = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = {k for row in metrics for k, v in row.items() if v != ""}
    for key in (
        "rl/rewards/inversion/mean",
        "rl/rewards/inversion/std",
        "rl/inversion/rollout_spearman",
        "rl/inversion/rollout_nan_frac",
        "rl/time/generate",
        "rl/time/score",
        "rl/time/inversion",
        "rl/time/update",
    ):
        assert key in logged, key
    nan_frac = [float(r["rl/inversion/rollout_nan_frac"]) for r in metrics if r.get("rl/inversion/rollout_nan_frac")]
    assert all(0.0 <= f <= 1.0 for f in nan_frac)


def test_generated_probe_source_and_tracker_state(tmp_path):
    cli = run_tiny(tmp_path, "--trainer.logger=false", "--trainer.callbacks.source=generated")
    tracker = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InversionTracker")
    assert tracker.source == "generated" and len(tracker.rows) == 6
    state = tracker.state_dict()
    tracker.rows = []
    tracker.load_state_dict(state)
    assert tracker.rows == state["rows"]
    run_dir = tmp_path / next(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert (run_dir / "emergence.csv").is_file()
    model, _ = load_policy(str(run_dir / "policy"))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_sketch_estimator_drives_the_tracker_and_the_reward_over_all_layers(tmp_path):
    cli = run_tiny(
        tmp_path,
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.log_every_n_steps=1",
        "--trainer.callbacks.strength.measure=frobenius",
        "--trainer.callbacks.strength.method=sketch",
        "--trainer.callbacks.strength.layers=all",
        "--trainer.callbacks.strength.sketch_dim=8",
        "--model.rl.inversion.coef=1.0",
        "--model.rl.inversion.min_tokens=2",
        "--model.rl.inversion.strength.measure=frobenius",
        "--model.rl.inversion.strength.method=sketch",
        "--model.rl.inversion.strength.layers=all",
        "--model.rl.inversion.strength.sketch_dim=8",
    )
    tracker = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InversionTracker")
    assert tracker.strength.method == "sketch" and tracker.strength.layers == "all"
    assert len(tracker.rows) == 6 and all(-1 <= r["spearman"] <= 1 and r["n_tokens"] > 0 for r in tracker.rows)
    metrics = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    nan_frac = [float(r["rl/inversion/rollout_nan_frac"]) for r in metrics if r.get("rl/inversion/rollout_nan_frac")]
    assert nan_frac and min(nan_frac) < 1.0  # some responses got a sketched rho_i


def test_top_entropy_quantile_trains_on_fewer_tokens_and_changes_the_update(grpo_weights, tmp_path):
    cli = run_tiny(tmp_path, "--trainer.logger=false", *SHAPED, "--model.rl.top_entropy_quantile=0.2")
    weights = final_weights(cli)
    assert all(torch.isfinite(w).all() for w in weights.values()) and cli.model.skipped_updates == 0
    assert any(not torch.equal(weights[k], grpo_weights[k]) for k in grpo_weights)


def test_clip_cov_and_kl_cov_train_and_log_the_selected_fraction(grpo_weights, tmp_path):
    clip_cov = run_tiny(
        tmp_path / "clip_cov",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path / 'clip_cov'}",
        "--trainer.log_every_n_steps=1",
        *SHAPED,
        "--model.rl.policy_loss=clip_cov",
        "--model.rl.cov_ratio=0.2",
        "--model.rl.clip_cov_lb=-100",
    )
    weights = final_weights(clip_cov)
    assert any(not torch.equal(weights[k], grpo_weights[k]) for k in grpo_weights)
    metrics = list(csv.DictReader(next((tmp_path / "clip_cov").rglob("metrics.csv")).open()))
    selected = [float(r["rl/clip_ratio/cov_selected"]) for r in metrics if r.get("rl/clip_ratio/cov_selected")]
    assert selected and all(0.0 < f <= 0.2 + 1e-6 for f in selected)
    kl_cov = run_tiny(tmp_path / "kl_cov", "--trainer.logger=false", *SHAPED, "--model.rl.policy_loss=kl_cov",
                      "--model.rl.num_iterations=2")  # fmt: skip
    assert all(torch.isfinite(w).all() for w in final_weights(kl_cov).values())
    assert kl_cov.model.skipped_updates == 0
