"""Hostile inputs and faults: every one gets a clear error or a counted, logged fallback; none gets NaN.

What is thrown at corrpo here (docs/reliability.md lists it with the figures): malformed dataset rows,
answers math-verify cannot parse, 10,000-character garbage and nested-brace bombs (each scored within 1 s),
empty completions, zero-variance groups, a constant-entropy response, a non-finite loss and a non-finite
gradient (update skipped, counted, warned; weights unchanged), bad config keys and types (an error naming
the key before training), and a reward function that raises on some samples (scored 0, counted, logged).
"""

import csv
import json
import math
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TINY_ARCH, run_tiny
from fault_rewards import poisoned
from hostile_completions import BOMBS
from reward_inputs import reward_inputs

from corrpo.cli import build_cli
from corrpo.data.arithmetic import ArithmeticTask
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.data.records import RecordError
from corrpo.module import CorrPOModule
from corrpo.rewards.accuracy import GOLD_TIME_BUDGET_S, TIME_BUDGET_S, accuracy_reward
from corrpo.rewards.combine import score_completions
from corrpo.rewards.format import format_reward
from corrpo.training.config import SFTConfig
from corrpo.training.corrpo_term import CorrPOTermConfig, corrpo_bonus, rollout_correlations
from corrpo.training.objectives import LossOptions, clipped_policy_loss, group_advantages, masked_mean


# ------------------------------------------------------------------------------------------- data rows
def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "named"),
    [
        ('{"prompt": "1+1=", "answer": ', "invalid JSON"),
        ({"prompt": "1+1="}, "field answer missing"),
        ({"prompt": "   ", "answer": "2"}, "field prompt must be a non-empty string"),
        ({"prompt": "", "answer": "2"}, "field prompt must be a non-empty string"),
        ('["not", "an", "object"]', "expected a JSON object"),
    ],
)
def test_a_malformed_row_in_a_big_file_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, bad_line, named):
    good = [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(2000)]
    path = _jsonl(tmp_path / "rl.jsonl", good[:1234] + [bad_line] + good[1234:])
    dm = ReasoningDataModule(rl_source=str(path), rl_steps=2, n_test=10)
    with pytest.raises(RecordError, match=rf"rl\.jsonl:1235: .*{named}"):
        dm.setup("fit")
    skipping = ReasoningDataModule(rl_source=str(path), rl_steps=2, n_test=10, on_error="skip")
    with pytest.warns(UserWarning, match=r"data.rl_source: skipped 1 malformed row\(s\) .*rl\.jsonl:1235"):
        skipping.setup("fit")
    assert skipping.n_skipped == 1
    assert len(skipping.pools()["rl"]) + len(skipping.test_records()) == 2000  # nothing else lost


# ---------------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("name", sorted(BOMBS))
def test_garbage_and_brace_bombs_score_zero_within_their_time_budget(name):
    completion = BOMBS[name]
    start = time.perf_counter()
    accuracy = accuracy_reward(["p"], [completion], answer=["42"])
    fmt = format_reward(["p"], [completion])
    elapsed = time.perf_counter() - start
    assert accuracy == [0.0] and fmt == [0.0]
    # one budget for the gold, one for the completion, plus slack for a busy machine: the deadline is what this
    # checks, not the machine's speed
    limit = 2 * TIME_BUDGET_S + 0.5
    assert elapsed <= limit, f"{name} took {elapsed:.2f} s (limit {limit} s)"


def test_a_stall_longer_than_a_completions_budget_leaves_the_gold_scorable_and_the_completion_scored_0(monkeypatch):
    """A gold answer's parse may take up to GOLD_TIME_BUDGET_S (a pause of a busy process must not make the
    sample unscorable); a completion's parse still runs out at TIME_BUDGET_S and scores 0."""
    import corrpo.rewards.accuracy as accuracy

    assert GOLD_TIME_BUDGET_S > 2 * TIME_BUDGET_S
    real_parse, stall = accuracy.parse, 1.5 * TIME_BUDGET_S

    def stalling(text, **kwargs):
        if "STALL" in text or "1234" in text:
            time.sleep(stall)  # interrupted by the deadline's SIGALRM like any parse
        return real_parse(text.replace("STALL", ""), **kwargs)

    monkeypatch.setattr(accuracy, "parse", stalling)
    assert accuracy_reward(["p"], ["<answer>1234</answer>"], answer=["STALL1234"]) == [0.0]  # gold parsed, answer not
    assert accuracy_reward(["p"], ["<answer>77</answer>"], answer=["STALL77"]) == [1.0]


def test_after_every_bomb_a_right_answer_still_scores_right_and_fast():
    for completion in BOMBS.values():  # interrupted parses must leave the parser usable
        accuracy_reward(["p"], [completion], answer=["42"])
    start = time.perf_counter()
    assert accuracy_reward(["p"] * 3, ["<answer>42</answer>", "<answer>\\frac{1}{2}</answer>", "<answer>7</answer>"],
                           answer=["42", "0.5", "8"]) == [1.0, 1.0, 0.0]  # fmt: skip
    assert time.perf_counter() - start <= 1.0


@pytest.mark.parametrize("gold", ["\\frac{", "}}}{{{", "", "   ", "\\boxed{" * 500, None, float("nan")])
def test_a_gold_answer_math_verify_cannot_parse_makes_the_sample_unscorable_not_wrong(gold):
    start = time.perf_counter()
    assert accuracy_reward(["p"], ["<answer>1</answer>"], answer=[gold]) == [None]
    assert time.perf_counter() - start <= 1.0
    scores = score_completions(
        {"accuracy": accuracy_reward}, [1.0], reward_inputs(["p"], ["<answer>1</answer>"], [gold])
    )
    assert scores.per_function["accuracy"].isnan().all() and scores.total.tolist() == [0.0]


def test_a_batch_of_bombs_and_empty_completions_scores_finite_totals():
    completions = list(BOMBS.values())
    fns = {"accuracy": accuracy_reward, "format": format_reward}
    scores = score_completions(
        fns, [1.0, 0.2], reward_inputs(["p"] * len(completions), completions, ["42"] * len(completions))
    )
    assert torch.isfinite(scores.total).all() and scores.total.abs().sum() == 0
    assert scores.n_failed == {"accuracy": 0, "format": 0}


# ------------------------------------------------------------------------------------- objectives
def test_a_group_with_equal_rewards_gets_zero_advantage_and_a_finite_zero_loss():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 4, scale)
        assert torch.isfinite(adv).all() and adv[:4].eq(0).all() and adv[4:].ne(0).all()
    log_probs = torch.randn(8, 5, requires_grad=True)
    mask = torch.ones(8, 5, dtype=torch.bool)
    out = clipped_policy_loss(log_probs, log_probs.detach(), torch.zeros(8), mask)
    out.loss.backward()
    assert out.loss.item() == 0.0 and log_probs.grad.abs().sum() == 0


def test_empty_completions_give_finite_losses_and_no_correlation():
    log_probs = torch.randn(4, 6, requires_grad=True)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[1, :3] = True  # one non-empty completion among empty ones
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        out = clipped_policy_loss(
            log_probs, log_probs.detach(), torch.tensor([1.0, -1.0, 0.5, 0.0]), mask, LossOptions(loss_type=loss_type)
        )  # fmt: skip
        assert torch.isfinite(out.loss) and torch.isfinite(out.clip_low)
    all_empty = torch.zeros(4, 6, dtype=torch.bool)
    assert masked_mean(torch.randn(4, 6), all_empty).item() == 0.0


def _tiny_policy():
    from corrpo.models.loading import load_policy

    return load_policy("tiny-qwen2", TINY_ARCH, "float32", None, 0)


def test_a_constant_entropy_response_and_an_empty_one_get_rho_nan_bonus_zero_and_are_counted():
    policy, tokenizer = _tiny_policy()
    ids = torch.tensor([tokenizer.encode("3 +4 =<think>3+4=7</think>", add_special_tokens=False)] * 3)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 5:] = True
    completion[2] = False  # the third response is empty
    config = CorrPOTermConfig(coef=1.0, min_tokens=2)
    rho, n_tokens, *_ = rollout_correlations(policy, ids, attention, completion, config)
    assert torch.isfinite(rho[:2]).all() and rho[2].isnan() and n_tokens[2] == 0
    # Constant logits (zero unembedding and no bias): every token's entropy is log2(V), a constant side.
    with torch.no_grad():
        policy.lm_head.weight.zero_()
    rho_const, n_const, *_ = rollout_correlations(policy, ids, attention, completion, config)
    assert rho_const.isnan().all() and n_const[:2].gt(2).all()
    bonus, valid = corrpo_bonus(rho_const, n_const, coef=1.0, min_tokens=2, group_size=3)
    assert bonus.tolist() == [0.0, 0.0, 0.0] and not valid.any()
    assert 1.0 - valid.float().mean() == 1.0  # what the module logs as inversion/rollout_nan_frac


# ------------------------------------------------------------------------------- non-finite updates
class _Saboteur(L.Callback):
    """At SFT step 1 the logits become NaN (non-finite loss); at step 2 one gradient becomes inf."""

    def __init__(self) -> None:
        self.handles, self.before, self.unchanged = [], {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        policy = pl_module.policy
        self.before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        if batch["step"] == 1:
            self.handles.append(policy.lm_head.register_forward_hook(lambda m, i, out: out * float("nan")))
        if batch["step"] == 2:
            weight = policy.model.layers[0].mlp.up_proj.weight
            self.handles.append(weight.register_hook(lambda g: g * float("inf")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        after = pl_module.policy.state_dict()
        self.unchanged[batch["step"]] = all(torch.equal(after[k], self.before[k]) for k in after)


def test_a_non_finite_loss_or_gradient_skips_the_update_counts_and_warns_and_training_goes_on(tmp_path):
    module = CorrPOModule(tiny=TINY_ARCH, sft=SFTConfig(steps=4, lr=1e-3, warmup_steps=0, max_length=64))
    data = ReasoningDataModule(arithmetic=ArithmeticTask(), n_train=100, sft_steps=4, sft_batch_size=4, n_test=4,
                               n_probe=4)  # fmt: skip
    saboteur = _Saboteur()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[saboteur])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, data)
    skipped = [str(w.message) for w in caught if "update skipped" in str(w.message)]
    assert len(skipped) == 2
    assert "non-finite loss" in skipped[0] and "non-finite gradient norm" in skipped[1]
    assert module.skipped_updates == 2 and trainer.global_step == 4  # 4 batches, 2 applied: skips still count
    assert saboteur.unchanged == {0: False, 1: True, 2: True, 3: False}
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert json.loads((tmp_path / "results.json").read_text())["skipped_updates"] == 2


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.rl.sampling.temprature=0.7", "temprature"),
        ("--data.sft_batchsize=4", "sft_batchsize"),
        ("--model.rl.inversion.coef=a_lot", "coef"),
        ("--model.sft.steps=-5", "sft.steps"),
        ("--model.rl.rewards=[accuracy, no_such_reward]", "no_such_reward"),
        ("--model.rl.reward_weights=[1.0]", "reward_weights"),
        ("--data.rl_batch_size=0", "rl_batch_size"),
        ("--trainer.callbacks.every_n_steps=0", "every_n_steps"),
        ("--trainer.callbacks.source=sampled", "source"),
        ("--model.rl.policy_loss=ppo2", "policy_loss"),
        ("--model.rl.clip_cov_lb=9", "clip_cov_lb"),
        ("--model.rl.top_entropy_quantile=0", "top_entropy_quantile"),
    ],
)
def test_bad_config_keys_and_values_name_the_key_before_training(override, named, tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError, TypeError, ImportError)) as info:
        build_cli(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), override,
                   f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert named in str(info.value) + capsys.readouterr().err
    assert not list(tmp_path.rglob("emergence.csv")) and not list(tmp_path.rglob("*.ckpt"))


def test_a_typo_inside_a_config_file_names_the_key(tmp_path, capsys):
    text = (REPO / "configs" / "tiny.yaml").read_text().replace("    num_generations: 8", "    num_generation: 8")
    config = tmp_path / "typo.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert "num_generation" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- faults
def test_a_reward_that_raises_on_some_samples_scores_them_zero_counts_logs_and_training_goes_on(tmp_path):
    csv_logger = '{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "%s"}}' % (
        tmp_path / "csv"
    )
    with pytest.warns(UserWarning, match="reward 'flaky' raised on sample"):
        cli = run_tiny(
            tmp_path,
            "--model.rl.rewards=[accuracy, format, fault_rewards:flaky]",
            "--model.rl.reward_weights=[1.0, 0.2, 0.1]",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger+={csv_logger}",
        )
    module = cli.model
    assert module.steps_done == module.schedule.total  # training went on to the end
    rows = module.last_completions
    expected_failed = sum(poisoned(r["completion"]) for r in rows)
    assert expected_failed > 0, "the tiny policy should produce some poisoned completions"
    for row in rows:
        assert row["reward/flaky"] == (0.0 if poisoned(row["completion"]) else 1.0)
        assert math.isfinite(row["reward"])
    (metrics_path,) = (tmp_path / "csv").rglob("metrics.csv")
    key = "rl/rewards/flaky/failed"
    logged = [float(r[key]) for r in csv.DictReader(metrics_path.open()) if r.get(key)]
    assert len(logged) == 3 and logged[-1] == expected_failed
