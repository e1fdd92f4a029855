"""Where the CorR-PO term enters (``rl.inversion.apply``) and its control (``rl.inversion.log_only``).

The control scores the statistic CorR-PO rewards under plain GRPO and must leave everything else bit for bit as
plain GRPO; ``apply: advantage`` adds lambda times the batch-standardised bonus to the task advantage (checked
against a hand computation, a zero-variance group included); lambda 0 is plain GRPO in both modes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH

from corrpo.data.arithmetic import ArithmeticTask
from corrpo.generation.rollout import SamplingConfig
from corrpo.module import CorrPOModule
from corrpo.rewards.combine import RewardScores
from corrpo.training.config import RLConfig
from corrpo.training.corrpo_term import CorrPOTerm, CorrPOTermConfig, enter_term, standardised_bonus
from corrpo.training.objectives import group_advantages

G = 4


def module_with(**inversion) -> CorrPOModule:
    rl = RLConfig(
        steps=3, lr=1e-3, num_generations=G, sampling=SamplingConfig(max_new_tokens=12),
        rewards=["shaped_rewards:length"], inversion={"min_tokens": 2, **inversion}, packing=False,
    )  # fmt: skip
    return CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, rl=rl, seed=0)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return ArithmeticTask().records("train", 3)


def one_step(module: CorrPOModule, records: list[dict]):
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=module.rl.lr, weight_decay=0.0)
    torch.manual_seed(7)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    return module.grpo(module.rl_context(optimizer), prompts, answers, rl_index=0)


def same_weights(a: CorrPOModule, b: CorrPOModule) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.policy.parameters(), b.policy.parameters(), strict=True))


@pytest.mark.parametrize("shared_forward", [True, False])
def test_the_control_logs_the_rewarded_statistic_and_leaves_plain_grpo_bit_for_bit(records, shared_forward, one_thread):
    plain, control = module_with(), module_with(log_only=True, shared_forward=shared_forward)
    plain_result, control_result = one_step(plain, records), one_step(control, records)
    assert "inversion/rollout_spearman" not in plain_result.metrics and plain_result.inversion is None
    rho = control_result.metrics["inversion/rollout_spearman"]
    assert torch.isfinite(torch.as_tensor(rho)) and control_result.inversion.valid.any()
    assert "inversion" not in control_result.scores.per_function  # nothing entered the rewards
    assert torch.equal(plain_result.rewards, control_result.rewards)
    assert torch.equal(plain_result.advantages, control_result.advantages)
    assert same_weights(plain, control)


def test_log_only_with_a_coefficient_is_refused_naming_both_keys():
    with pytest.raises(ValueError, match=r"rl.inversion.log_only .* rl.inversion.coef is 0.5"):
        CorrPOTermConfig(coef=0.5, log_only=True)
    with pytest.raises(ValueError, match="rl.inversion.apply must be one of"):
        CorrPOTermConfig(coef=0.5, apply="loss")


def hand_standardised(rho: np.ndarray, valid: np.ndarray) -> np.ndarray:
    b = np.where(valid, np.clip(-rho, -1, 1), 0.0)
    mean, std = b[valid].mean(), b[valid].std(ddof=1)
    return np.where(valid, (b - mean) / (std + 1e-4), 0.0)


def test_apply_advantage_adds_lambda_times_the_batch_standardised_bonus_zero_variance_groups_included():
    # group 0's task rewards all agree (its task advantage is 0): there the term is the whole advantage, at lambda's
    # scale; group 1's differ. One response of group 1 has no valid correlation (no term).
    task = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5])
    rho = torch.tensor([-0.6, 0.2, 0.1, -0.3, 0.4, float("nan"), -0.9, 0.0], dtype=torch.float64)
    valid = rho.isfinite()
    coef = 0.3
    term = CorrPOTerm(
        bonus=torch.zeros(8), rho=rho, valid=valid, coef=coef, entropy=torch.zeros(8, 1), strength=torch.zeros(8, 1)
    )
    scores = RewardScores(per_function={"task": task}, total=task.clone(), n_failed={}, n_unscored={})
    config = CorrPOTermConfig(coef=coef, apply="advantage")
    out_scores, rewards, advantages = enter_term(term, config, scores, G, "group")
    t = task.numpy().reshape(2, G).astype(np.float64)
    centred = t - t.mean(1, keepdims=True)
    task_adv = np.where(centred == 0, 0.0, centred / (t.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    expected = task_adv + coef * hand_standardised(rho.numpy(), valid.numpy())
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.allclose(advantages[:G].numpy(), coef * hand_standardised(rho.numpy(), valid.numpy())[:G], atol=1e-6)
    assert advantages[5] == pytest.approx(task_adv[5], abs=1e-6)  # the invalid response: the task's advantage only
    assert torch.equal(rewards, task) and out_scores is scores  # the rewards stay the task's


def test_fewer_than_two_valid_responses_give_no_standardised_term():
    rho = torch.tensor([0.5, float("nan"), float("nan")], dtype=torch.float64)
    assert torch.equal(standardised_bonus(rho, rho.isfinite()), torch.zeros(3))


def test_apply_advantage_in_the_step_adds_lambda_times_the_standardised_bonus(records, one_thread):
    result = one_step(module_with(coef=0.5, apply="advantage"), records)
    term = result.inversion
    assert term is not None and term.valid.sum() >= 2 and "inversion" not in result.scores.per_function
    task = group_advantages(result.rewards, G, "group")
    expected = task + 0.5 * torch.as_tensor(hand_standardised(term.rho.numpy(), term.valid.numpy()), dtype=task.dtype)
    torch.testing.assert_close(result.advantages, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("apply", ["reward", "advantage"])
def test_lambda_zero_is_plain_grpo_bit_for_bit_in_both_modes(records, apply, one_thread):
    plain, zero = module_with(), module_with(coef=0.0, apply=apply)
    plain_result, zero_result = one_step(plain, records), one_step(zero, records)
    assert zero_result.inversion is None
    assert torch.equal(plain_result.advantages, zero_result.advantages) and same_weights(plain, zero)
