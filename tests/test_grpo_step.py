"""The RL step as plain code: one :class:`GRPOStep` on a tiny model, no Trainer, against a hand-wired step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_ARCH
from strength_checks import spearman_flip_bound

import corrpo.models.packing
from corrpo.data.arithmetic import ArithmeticTask
from corrpo.generation.rollout import SamplingConfig
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig
from corrpo.training.grpo import RLStepResult
from corrpo.training.objectives import group_advantages

G = 4
REWARDS = ["shaped_rewards:length"]  # differs within a group, so the advantages are not all 0


def build(coef: float = 0.0) -> CorrPOModule:
    rl = RLConfig(
        steps=3, lr=1e-3, num_generations=G, sampling=SamplingConfig(max_new_tokens=12), rewards=REWARDS,
        inversion={"coef": coef, "min_tokens": 2}, packing=False,
    )  # fmt: skip  # the hand-wired step is the padded forward (tests/test_packing.py: packed == padded)
    return CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, rl=rl, seed=0)


def adam(module: CorrPOModule) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.policy.parameters(), lr=module.rl.lr, weight_decay=0.0)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return ArithmeticTask().records("train", 3)


def hand_wired_step(module: CorrPOModule, optimizer, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: sample, score, GRPO advantages and the dapo token-mean surrogate written out by hand."""
    prompts = [r["prompt"] for r in records]
    rollout = module.generate_rollout(prompts, G)
    completions = module.decode_completions(rollout)
    rewards = torch.tensor([len(c) / 100 for c in completions])
    grouped = rewards.view(-1, G)
    centred = grouped - grouped.mean(1, keepdim=True)
    advantages = torch.where(centred == 0, 0.0, centred / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    # only the positions that predict completion tokens are unembedded (as the pipeline does, to save the prompt's
    # logits): the lm_head matmul then has the pipeline's shape, so both round alike and AdamW's first step, which
    # divides each gradient by its own magnitude, sees the same near-zero gradients
    width = rollout.completion_ids.shape[1] + 1
    logits = module.policy(
        rollout.sequences, attention_mask=rollout.attention_mask, position_ids=position_ids, logits_to_keep=width
    ).logits
    logits = logits[:, :-1].float()
    log_probs = logits.log_softmax(-1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(log_probs - log_probs.detach())  # one iteration: the ratio is 1, its gradient is not
    mask = rollout.completion_mask.float()
    loss = -(ratio * advantages[:, None] * mask).sum() / mask.sum()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.policy.parameters(), module.rl.max_grad_norm)
    optimizer.step()
    return rewards, advantages


def test_one_rl_step_without_a_trainer_matches_a_hand_wired_step(records, one_thread):
    pipeline_module, reference_module = build(), build()
    pipeline_opt, reference_opt = adam(pipeline_module), adam(reference_module)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    torch.manual_seed(7)
    result = pipeline_module.grpo(pipeline_module.rl_context(pipeline_opt), prompts, answers, rl_index=0)
    torch.manual_seed(7)
    rewards, advantages = hand_wired_step(reference_module, reference_opt, records)

    assert isinstance(result, RLStepResult) and [u.applied for u in result.updates] == [True]
    assert torch.allclose(result.rewards, rewards, atol=1e-6)
    assert advantages.abs().max() > 0.1  # the step really moved the weights
    assert torch.allclose(result.advantages, advantages, atol=1e-5)
    moved = max(
        (a - b).abs().max().item()
        for a, b in zip(pipeline_module.policy.parameters(), build().policy.parameters(), strict=True)
    )
    assert moved > 1e-5
    for a, b in zip(pipeline_module.policy.parameters(), reference_module.policy.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert len(result.completions) == len(records) * G and set(result.timings) == {"generate", "score", "update"}
    assert result.metrics["reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    assert "rewards/inversion/mean" not in result.metrics  # coef 0: plain GRPO computes no CorR-PO term


def test_the_corrpo_term_is_a_reward_stage_with_its_own_values(records, one_thread):
    module = build(coef=0.5)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    torch.manual_seed(7)
    result = module.grpo(module.rl_context(adam(module)), prompts, answers, rl_index=0)
    term = result.inversion
    assert term is not None and term.coef == 0.5 and term.valid.any()
    expected = torch.where(term.valid, 0.5 * (-term.rho).clamp(-1, 1), 0.0).float()
    assert torch.allclose(term.bonus, expected, atol=1e-6)
    task_total = sum(torch.nan_to_num(v) for k, v in result.scores.per_function.items() if k != "inversion")
    assert torch.allclose(result.rewards, task_total + term.bonus, atol=1e-6)  # the term adds, nothing else changes
    assert torch.equal(result.scores.per_function["inversion"], term.bonus)
    rho_rows = [row["rho"] for row in result.completions]
    assert all(
        math.isnan(a) and math.isnan(b) or a == pytest.approx(b)
        for a, b in zip(rho_rows, term.rho.tolist(), strict=True)
    )
    assert "inversion" in result.timings and "inversion/rollout_spearman" in result.metrics


def corrpo_step(
    shared: bool, records: list[dict], projections: list[str], packing: bool = False
) -> tuple[RLStepResult, CorrPOModule]:
    """One CorR-PO step with the term scored on the update's forward (``shared``) or by a separate pass."""
    module = build(coef=0.5)
    module.rl.inversion.shared_forward = shared
    module.rl.packing = packing
    module.rl.inversion.strength.projections = tuple(projections)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    torch.manual_seed(7)
    return module.grpo(module.rl_context(adam(module)), prompts, answers, rl_index=0), module


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("projections", [["q", "v", "o"], ["q", "k", "v", "o", "mlp"]])
def test_the_shared_forward_gives_the_separate_passes_bonus_and_update(
    records, projections, packing, one_thread, packings, monkeypatch
):
    """``packing``: the shared forward (and both updates) run on packed rows, the separate pass stays padded. Rows
    of twice the longest sequence, so these near-equal lengths do share rows.

    The term: per-token values to float tolerance, each rho within the bound of the pairs the two sides order
    differently (:func:`assert_same_term`). The update: where no pair flips (the ranks are the same, so are rho, the
    bonus and the advantages), both updates give the same weights. A rank statistic can swap a near-tie at rounding
    level on some CPUs; then the bonuses differ by up to lambda times that bound, and each step's advantages are
    checked against its own rewards instead (the weights then legitimately differ)."""
    monkeypatch.setattr(corrpo.models.packing, "WIDTH_FACTORS", (2.0,))
    shared, shared_module = corrpo_step(True, records, projections, packing)
    separate, separate_module = corrpo_step(False, records, projections, packing)
    assert shared.inversion.shared_forward and not separate.inversion.shared_forward
    if not assert_same_term(shared.inversion, separate.inversion):
        for result in (shared, separate):
            assert torch.allclose(result.advantages, group_advantages(result.rewards, G, "group"), atol=1e-6)
        return
    assert torch.allclose(shared.inversion.bonus, separate.inversion.bonus, atol=1e-6)
    assert torch.allclose(shared.advantages, separate.advantages, atol=1e-5)
    for a, b in zip(shared_module.policy.parameters(), separate_module.policy.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)  # the first update went through the same forward
    assert any(rows < n for n, rows in packings if n > 2) == packing  # packed rows where asked (2: the check)


def assert_same_term(shared, separate) -> bool:
    """Two Spearman :class:`CorrPOTerm` of the same rollout: the same valid responses and scored tokens, per-token
    ``H`` and ``S`` equal to float tolerance, each rho within :func:`spearman_flip_bound` of those values (no flip:
    rounding), each bonus within ``lambda`` times that. Returns whether no pair flipped (the same ranks)."""
    assert separate.valid.any() and torch.equal(shared.valid, separate.valid)
    scored = separate.strength.isfinite()
    assert torch.equal(shared.strength.isfinite(), scored) and torch.equal(shared.entropy.isfinite(), scored)
    torch.testing.assert_close(shared.entropy[scored], separate.entropy[scored], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared.strength[scored], separate.strength[scored], rtol=1e-5, atol=1e-9)
    same_ranks = True
    for i in separate.valid.nonzero().flatten().tolist():
        row = scored[i]
        bound = spearman_flip_bound(
            shared.entropy[i, row], shared.strength[i, row], separate.entropy[i, row], separate.strength[i, row]
        )
        gap = abs(shared.rho[i].item() - separate.rho[i].item())
        assert gap <= bound + 1e-6, f"response {i}: rho gap {gap:.2e} > {bound:.2e}, the flipped pairs' bound"
        assert abs(shared.bonus[i].item() - separate.bonus[i].item()) <= separate.coef * (bound + 1e-6)
        same_ranks = same_ranks and bound == 0
    return same_ranks


def test_the_shared_forward_is_refused_where_it_would_not_be_exact(records):
    from corrpo.training.corrpo_term import shares_update_forward

    module = build(coef=0.5)
    config = module.rl.inversion
    assert shares_update_forward(module.policy, config, 1) is None
    assert "micro-batches" in shares_update_forward(module.policy, config, 2)
    module.policy.config.attention_dropout = 0.1
    assert "dropout" in shares_update_forward(module.policy, config, 1)
    module.policy.config.attention_dropout = 0.0
    module.policy.gradient_checkpointing_enable()
    assert "checkpointing" in shares_update_forward(module.policy, config, 1)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "granite", "llama"])
@pytest.mark.parametrize("packing", [False, True])
def test_the_shared_term_equals_the_separate_pass_on_families_with_a_logit_map(family, packing, one_thread):
    """The shared term reads each chosen logit from the unembedding's input (``chosen_logits``), then the family's
    logit map: Gemma 2's soft-cap (its slope differs per token, so rho would differ without it), Granite's
    ``/ logits_scaling``. The same term as the separate pass, which scores its own forward, padded or packed: per-token
    values to float tolerance, rho within the bound of the pairs they order differently."""
    from corrpo.generation.rollout import Rollout
    from corrpo.models.tiny_families import random_family_model
    from corrpo.training.corrpo_term import CorrPOTermConfig, corrpo_term, corrpo_term_on_update_forward

    vocab, rows, P, L = 40, 6, 5, 14
    policy = random_family_model(family, vocab, TINY_ARCH)
    gen = torch.Generator().manual_seed(1)
    sequences = torch.randint(2, vocab, (rows, P + L), generator=gen)
    lengths = torch.tensor([14, 9, 12, 14, 6, 11])
    completion = torch.arange(L) < lengths[:, None]
    attention = torch.cat([torch.ones(rows, P, dtype=torch.bool), completion], 1).long()
    rollout = Rollout(
        sequences=sequences.masked_fill(attention == 0, 0), attention_mask=attention,
        completion_mask=completion, truncated=lengths == L, prompt_length=P,
    )  # fmt: skip
    config = CorrPOTermConfig(coef=0.5, min_tokens=2)
    config.strength.projections = ("q", "k", "v", "o")
    separate = corrpo_term(policy, rollout, config, 0, 3)
    shared, _ = corrpo_term_on_update_forward(policy, rollout, config, 0, 3, packed=packing)
    assert separate.valid.all()
    assert_same_term(shared, separate)
