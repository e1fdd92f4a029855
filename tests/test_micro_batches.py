"""Micro-batching and gradient checkpointing change memory, never the update: the same weights as the full batch.

Two identical tiny modules take the same step, one on the whole batch, one in micro-batches (or with gradient
checkpointing). The comparisons use SGD: AdamW's first step divides each gradient element by its own magnitude,
so a rounding difference (~1e-7 relative, from matmuls of a different row count) in a near-zero gradient becomes a
~1e-5 relative weight difference that says nothing about the accumulation; SGD passes the gradient through
linearly, so equal weights mean equal accumulated gradients. One test runs AdamW for the skip guard's state.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCH

from corrpo.data.arithmetic import ArithmeticTask
from corrpo.generation.rollout import SamplingConfig, concat_rollouts
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig, SFTConfig
from corrpo.training.corrpo_term import CorrPOTermConfig, rollout_correlations
from corrpo.training.forward import row_chunks
from corrpo.training.sft import SFTContext, sft_step

pytestmark = pytest.mark.usefixtures("one_thread")
G = 4
REWARDS = ["shaped_rewards:length"]  # differs within a group, so the advantages are not all 0


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return ArithmeticTask().records("train", 6)


def max_relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """``max |a - b| / max |b|`` over each weight tensor, the largest over the model."""
    return max(
        ((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


def update_relative_difference(a: torch.nn.Module, b: torch.nn.Module, start: torch.nn.Module) -> float:
    """``max |a - b| / max |b - start|``: the difference against the size of the update itself."""
    diff = max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))
    moved = max((y - s).abs().max().item() for y, s in zip(b.parameters(), start.parameters(), strict=True))
    assert moved > 1e-5, "the step must move the weights, or equality proves nothing"
    return diff / moved


def sgd(module: CorrPOModule, lr: float = 0.5) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.policy.parameters(), lr=lr)


def test_row_chunks_cover_the_batch_once():
    assert row_chunks(5, None) == [slice(0, 5)]
    assert row_chunks(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert row_chunks(3, 8) == [slice(0, 3)]


# ------------------------------------------------------------------------------------------------ SFT
@pytest.mark.parametrize("micro_batch_size", [1, 4])
def test_a_micro_batched_sft_step_gives_the_full_batch_weights(records, micro_batch_size):
    prompts, completions = [r["prompt"] for r in records], [r["completion"] for r in records]
    results = {}
    for size in (None, micro_batch_size):
        config = SFTConfig(steps=2, lr=0.5, max_length=64, micro_batch_size=size)
        module = CorrPOModule(tiny=TINY_ARCH, sft=config, seed=0)
        optimizer = sgd(module)
        context = SFTContext(module.policy, module.tokenizer, optimizer)
        losses = [sft_step(context, config, prompts, completions, s) for s in (0, 1)]
        results[size] = module, losses
    (full, full_losses), (micro, micro_losses) = results[None], results[micro_batch_size]
    assert max_relative_difference(micro.policy, full.policy) <= 1e-6
    assert update_relative_difference(micro.policy, full.policy, CorrPOModule(tiny=TINY_ARCH, seed=0).policy) <= 1e-4
    for a, b in zip(micro_losses, full_losses, strict=True):  # the logged loss is the whole batch's token mean
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------- RL
def rl_module(micro_batch_size: int | None, gradient_checkpointing: bool = False, **rl) -> CorrPOModule:
    rl.setdefault("sampling", SamplingConfig(max_new_tokens=12))
    config = RLConfig(
        steps=2, lr=0.5, num_generations=G, rewards=REWARDS, micro_batch_size=micro_batch_size, **rl,
    )  # fmt: skip
    module = CorrPOModule(tiny=TINY_ARCH, rl=config, seed=0, gradient_checkpointing=gradient_checkpointing)
    if module.ref_policy is not None:  # a reference that differs from the policy, so the KL has a gradient
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in module.ref_policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module


def rl_step(module: CorrPOModule, records: list[dict], optimizer=None):
    torch.manual_seed(7)  # the same rollout for both modules
    prompts, answers = [r["prompt"] for r in records[:3]], [r["answer"] for r in records[:3]]
    return module.grpo(module.rl_context(optimizer or sgd(module)), prompts, answers, rl_index=0)


RL_VARIANTS = {
    "grpo": dict(loss_type="grpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo"),
    "bnpo": dict(loss_type="bnpo"),
    "kl": dict(loss_type="dapo", beta=0.5),
    "two_iterations": dict(loss_type="grpo", num_iterations=2, epsilon_low=0.01, epsilon_high=0.01),
    "top_entropy": dict(loss_type="dapo", top_entropy_quantile=0.3),
    "clip_cov": dict(loss_type="dapo", policy_loss="clip_cov", cov_ratio=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0),
    "kl_cov": dict(loss_type="dr_grpo", policy_loss="kl_cov", cov_ratio=0.1, num_iterations=2),
    "gspo_delta_temperature": dict(
        loss_type="grpo",
        importance_sampling_level="sequence",
        num_iterations=2,
        delta=1.05,
        epsilon_low=0.01,
        epsilon_high=0.01,
        sampling=dict(temperature=0.7, max_new_tokens=12),
    ),  # fmt: skip
    "entropy_bonus_top_entropy": dict(loss_type="dapo", entropy_coef=0.1, top_entropy_quantile=0.5),
}


@pytest.mark.parametrize("variant", list(RL_VARIANTS))
def test_a_micro_batched_rl_step_gives_the_full_batch_weights(records, variant):
    options = dict(RL_VARIANTS[variant])
    full, micro = rl_module(None, **options), rl_module(5, **options)
    full_result, micro_result = rl_step(full, records), rl_step(micro, records)
    assert torch.equal(full_result.rewards, micro_result.rewards)  # one rollout, so the comparison is the update
    assert [u.applied for u in micro_result.updates] == [True] * full.rl.num_iterations
    assert max_relative_difference(micro.policy, full.policy) <= 1e-6
    assert update_relative_difference(micro.policy, full.policy, CorrPOModule(tiny=TINY_ARCH, seed=0).policy) <= 1e-4
    for key in ("loss", "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/cov_selected"):
        if key in full_result.metrics:
            expected = float(full_result.metrics[key])
            assert float(micro_result.metrics[key]) == pytest.approx(expected, rel=1e-5, abs=1e-7), key


def test_a_non_finite_micro_batch_skips_the_update_and_leaves_weights_and_adamw_state_untouched(records):
    module = rl_module(5)
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-3)
    rl_step(module, records, optimizer)  # a first update, so that AdamW has a state to keep
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    calls = []

    def second_chunk_nan(_module, _inputs, output):
        if not torch.is_grad_enabled():  # generation
            return output
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    handle = module.policy.lm_head.register_forward_hook(second_chunk_nan)
    try:
        result = rl_step(module, records, optimizer)
    finally:
        handle.remove()
    assert [u.applied for u in result.updates] == [False] and "non-finite loss" in result.updates[0].skipped
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
    for p, s in optimizer.state.items():
        assert all(torch.equal(v, state_before[id(p)][k]) for k, v in s.items())
    assert all(p.grad is None for p in module.policy.parameters())


def test_generation_in_chunks_concatenates_prompt_major_rollouts(records):
    module = CorrPOModule(tiny=TINY_ARCH, rl=RLConfig(sampling=SamplingConfig(max_new_tokens=8)), seed=0)
    prompts = [r["prompt"] for r in records[:5]]
    whole = module.generate_rollout(prompts, 1, greedy=True)
    module.rl.generation_batch_size = 2
    chunked = module.generate_rollout(prompts, 1, greedy=True)
    assert module.decode_completions(chunked) == module.decode_completions(whole)
    assert chunked.prompt_length == whole.prompt_length
    assert torch.equal(chunked.completion_mask.sum(1), whole.completion_mask.sum(1))
    assert torch.equal(chunked.truncated, whole.truncated)
    assert concat_rollouts([whole], module.tokenizer.pad_token_id) is whole


# -------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_the_same_sft_and_rl_weights(records):
    prompts, completions = [r["prompt"] for r in records], [r["completion"] for r in records]
    config = SFTConfig(steps=1, lr=0.5, max_length=64)
    plain, checkpointed = rl_module(None), rl_module(None, gradient_checkpointing=True)
    assert all(m.gradient_checkpointing for m in checkpointed.policy.model.layers)
    assert not any(m.gradient_checkpointing for m in plain.policy.model.layers)
    for module in (plain, checkpointed):
        sft_step(SFTContext(module.policy, module.tokenizer, sgd(module)), config, prompts, completions, 0)
        rl_step(module, records)
    assert max_relative_difference(checkpointed.policy, plain.policy) <= 1e-6


@pytest.mark.parametrize("method", ["onepass", "loop"])
def test_gradient_checkpointing_keeps_the_inversion_scores_exact(records, method):
    plain, checkpointed = rl_module(None), rl_module(None, gradient_checkpointing=True)
    rollout = plain.generate_rollout([r["prompt"] for r in records[:2]], 2)
    checkpointed.policy.train()  # checkpointing is live in train mode: scoring must switch it off for its pass
    reference = CorrPOTermConfig(strength={"method": "loop", "projections": ["q", "k", "v", "o"]})
    config = CorrPOTermConfig(strength={"method": method, "projections": ["q", "k", "v", "o"]})
    args = (rollout.sequences, rollout.attention_mask, rollout.token_mask)
    rho_loop, n_loop, *_ = rollout_correlations(plain.policy, *args, reference, rows_per_chunk=4)
    rho, n, *_ = rollout_correlations(checkpointed.policy, *args, config, rows_per_chunk=3)
    assert torch.equal(n, n_loop) and n.min() > 2
    torch.testing.assert_close(rho, rho_loop, rtol=1e-4, atol=1e-4)
    assert checkpointed.policy.training  # restored, and checkpointing with it
    assert all(m.gradient_checkpointing for m in checkpointed.policy.model.layers)
