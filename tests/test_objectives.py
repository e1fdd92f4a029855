"""Advantages, loss aggregations, clipping and the k3 KL against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from corrpo.training.objectives import (
    LossOptions,
    TokenSelection,
    aggregate_token_loss,
    clipped_policy_loss,
    group_advantages,
    high_entropy_mask,
    kl_k3,
    token_log_probs,
    token_log_probs_and_entropy,
    zero_std_fraction,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4, scale="group", eps=0.0)
    # group 1: mean 0.5, unbiased std = sqrt(4 * 0.25 / 3)
    std = math.sqrt(1.0 / 3.0)
    expected = torch.tensor([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_zero_variance_group_gives_zero_advantage_not_nan():
    adv = group_advantages(torch.tensor([3.0, 3.0, 3.0]), group_size=3)
    assert torch.equal(adv, torch.zeros(3))
    assert zero_std_fraction(torch.tensor([3.0, 3.0, 1.0, 2.0]), 2).item() == 0.5


def test_group_advantages_batch_and_none_scale():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0])
    none = group_advantages(rewards, 2, scale="none")
    torch.testing.assert_close(none, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    batch = group_advantages(rewards, 2, scale="batch", eps=0.0)
    torch.testing.assert_close(batch, none / rewards.std())


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of G"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="inf"):
        group_advantages(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(2), 2, scale="rank")


NAN = float("nan")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscorable_rewards_leave_the_baseline_and_get_zero_advantage_as_trl_computes_it(scale):
    """A NaN reward (every reward returned None) is left out of its group's mean and std and gets advantage 0: the
    scored samples' advantages are those of the batch without it (numpy by hand, TRL's formula: (r - nanmean) /
    (Bessel nanstd + 1e-4))."""
    rewards = torch.tensor([1.0, NAN, 0.0, 2.0, 5.0, 5.0, NAN, 3.0])
    adv = group_advantages(rewards, 4, scale=scale)
    r = rewards.numpy().astype(np.float64).reshape(2, 4)
    mean = np.nanmean(r, axis=1, keepdims=True)
    if scale == "group":
        std = np.nanstd(r, axis=1, ddof=1, keepdims=True)
    else:
        std = np.full_like(mean, np.nanstd(r, ddof=1))
    expected = (r - mean) if scale == "none" else (r - mean) / (std + 1e-4)
    expected = np.nan_to_num(expected, nan=0.0).reshape(-1)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert adv[1] == 0 and adv[6] == 0


def test_a_group_with_one_scored_reward_gets_zero_advantages_and_counts_as_zero_std():
    rewards = torch.tensor([NAN, 1.0, NAN, NAN, 0.0, 1.0])
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[4] < 0 < adv[5]
    assert zero_std_fraction(rewards, 3).item() == 0.5


def test_finite_rewards_take_the_plain_arithmetic_bit_for_bit():
    """Without NaN the advantages are exactly the plain mean/std formula (the default run is unchanged)."""
    rewards = torch.rand(64, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(-1, 8)
    expected = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.equal(group_advantages(rewards, 8), expected)


def test_top_entropy_mask_drops_the_policy_term_only_and_keeps_the_kl_on_every_token():
    """TRL masks the policy term by entropy and adds beta * KL on every completion token afterwards."""
    torch.manual_seed(0)
    logp = torch.randn(2, 4, requires_grad=True)
    ref = torch.randn(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    keep = torch.tensor([[True, False, True, False], [False, False, True, True]])
    adv = torch.tensor([1.0, -0.5])
    options = LossOptions(beta=0.1, loss_type="dapo")
    out = clipped_policy_loss(logp, logp.detach(), adv, mask, options, ref, TokenSelection(train_mask=keep))
    per_token = -adv[:, None] * keep + 0.1 * kl_k3(logp, ref)
    torch.testing.assert_close(out.loss, per_token.sum() / mask.sum())
    (grad,) = torch.autograd.grad(out.loss, logp)
    (expected,) = torch.autograd.grad((-(adv[:, None]) * torch.exp(logp - logp.detach()) * keep
                                       + 0.1 * kl_k3(logp, ref)).sum() / 8, logp)  # fmt: skip
    torch.testing.assert_close(grad, expected)
    assert (grad[~keep] != 0).all()  # the KL still pulls the unselected tokens


def test_bias_corrected_kl_multiplies_k3_by_the_ratio_with_its_gradient():
    torch.manual_seed(1)
    logp = torch.randn(3, 5, requires_grad=True)
    old, ref = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    adv = torch.zeros(3)  # the policy term is 0: the gradient is the KL's alone
    options = LossOptions(beta=1.0, loss_type="dapo", use_bias_correction_kl=True)
    out = clipped_policy_loss(logp, old, adv, mask, options, ref)
    (grad,) = torch.autograd.grad(out.loss, logp)
    (expected,) = torch.autograd.grad((kl_k3(logp, ref) * torch.exp(logp - old)).sum() / 15, logp)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(out.kl, (kl_k3(logp, ref) * torch.exp(logp - old)).detach().mean())


def test_kl_k3_by_hand():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -2.0])
    d = -0.5
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([math.exp(d) - d - 1, 0.0]))
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_token_log_probs_matches_log_softmax():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, 1, 4], [2, 2, 3]])
    expected = torch.stack([logits[b, t].log_softmax(-1)[targets[b, t]] for b in range(2) for t in range(3)]).view(2, 3)
    torch.testing.assert_close(token_log_probs(logits, targets), expected)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # per-sequence mean, then mean
        ("dapo", (1 + 2 + 3 + 4) / 4),  # token mean over the batch
        ("dr_grpo", (1 + 2 + 3 + 4) / (2 * 8)),  # constant normaliser N * max_len
        ("bnpo", (1 + 2 + 3 + 4) / 4),  # this process's token mean
    ],
)
def test_loss_aggregations_by_hand(loss_type, expected):
    assert aggregate_token_loss(PER_TOKEN, MASK, loss_type, max_completion_length=8).item() == pytest.approx(expected)


def test_dapo_takes_the_global_token_count_and_bnpo_keeps_its_own():
    # a rank holding 4 of 10 tokens under 2-process DDP: dapo divides by 10 / 2 = 5, bnpo by its own 4
    assert aggregate_token_loss(PER_TOKEN, MASK, "dapo", 8, num_tokens=5.0).item() == pytest.approx(10 / 5)
    assert aggregate_token_loss(PER_TOKEN, MASK, "bnpo", 8, num_tokens=5.0).item() == pytest.approx(10 / 4)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_token_loss(PER_TOKEN, MASK, "ppo", 4)


def test_clipped_surrogate_by_hand():
    # one sequence, two tokens; ratios 1.5 and 0.5
    old = torch.log(torch.tensor([[0.2, 0.4]]))
    new = torch.log(torch.tensor([[0.3, 0.2]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    pos = clipped_policy_loss(new, old, torch.tensor([1.0]), mask, LossOptions(0.2, 0.2, loss_type="dapo"))
    # A>0: min(1.5, 1.2) = 1.2 ; min(0.5, 0.8) = 0.5 -> loss = -(1.2 + 0.5)/2
    assert pos.loss.item() == pytest.approx(-(1.2 + 0.5) / 2)
    assert pos.clip_high.item() == pytest.approx(0.5) and pos.clip_low.item() == 0.0
    neg = clipped_policy_loss(new, old, torch.tensor([-1.0]), mask, LossOptions(0.2, 0.28, loss_type="dapo"))
    # A<0: -min(-1.5, -1.28) = 1.5 ; -min(-0.5, -0.8) = 0.8
    assert neg.loss.item() == pytest.approx((1.5 + 0.8) / 2)
    assert neg.clip_low.item() == pytest.approx(0.5) and neg.clip_high.item() == 0.0


def test_ratio_one_gives_policy_gradient_and_kl_term():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3))
    logp = token_log_probs(logits, targets)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    out = clipped_policy_loss(logp, logp.detach(), adv, mask, LossOptions(loss_type="dapo"))
    assert out.loss.item() == pytest.approx(-(adv.unsqueeze(1).expand(2, 3)).mean().item())
    ref = logp.detach() - 0.1
    with_kl = clipped_policy_loss(logp, logp.detach(), adv, mask, LossOptions(loss_type="dapo", beta=0.5), ref)
    expected_kl = math.exp(-0.1) + 0.1 - 1
    assert with_kl.kl.item() == pytest.approx(expected_kl, rel=1e-4)
    assert with_kl.loss.item() == pytest.approx(out.loss.item() + 0.5 * expected_kl, rel=1e-4)
    with pytest.raises(ValueError, match="ref_log_probs"):
        clipped_policy_loss(logp, logp, adv, mask, LossOptions(beta=0.1))


def test_high_entropy_mask_keeps_the_top_fraction_by_numpys_quantile():
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(6, 9, generator=gen) * 5
    mask = torch.rand(6, 9, generator=gen) > 0.3
    entropy[~mask] = float("nan")  # padding may hold anything
    for q in (0.2, 0.5, 0.9):
        threshold = np.quantile(entropy[mask].numpy(), 1 - q)  # linear interpolation, numpy's default
        expected = mask & (entropy >= torch.tensor(threshold, dtype=torch.float32))
        got = high_entropy_mask(entropy, mask, q)
        assert torch.equal(got, expected)
        assert abs(got.sum().item() - q * mask.sum().item()) <= 1
    assert torch.equal(high_entropy_mask(entropy, mask, 1.0), mask)
    assert not high_entropy_mask(entropy, torch.zeros_like(mask), 0.2).any()


def test_high_entropy_mask_over_gathered_ranks_uses_one_global_threshold():
    # rank 0 holds only low entropies: with a global top-50% it keeps nothing
    entropy = torch.stack([torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([[2.0, 3.0, 4.0]])])
    mask = torch.ones_like(entropy, dtype=torch.bool)
    keep = high_entropy_mask(entropy, mask, 0.5)
    assert keep[0].sum() == 0 and keep[1].tolist() == [[True, True, True]]
    with pytest.raises(ValueError, match="top_quantile"):
        high_entropy_mask(entropy, mask, 0.0)


def test_train_mask_zeroes_the_other_tokens_but_keeps_the_normaliser():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    train = torch.tensor([[True, False, True], [False, True, False]])
    advantages = torch.tensor([1.0, -2.0])
    out = clipped_policy_loss(
        log_probs, log_probs.detach(), advantages, mask, LossOptions(loss_type="dapo"), selection=TokenSelection(train)
    )
    # ratio 1: per-token loss -A; kept tokens: row 0 twice (A=1), row 1 once (A=-2); 5 tokens in the mask
    assert out.loss.item() == pytest.approx((-1.0 - 1.0 + 2.0) / 5)
    out.loss.backward()
    expected = -(advantages.unsqueeze(1) * train) / 5
    torch.testing.assert_close(log_probs.grad, expected)


def test_high_entropy_mask_takes_batches_beyond_torch_quantiles_size_limit():
    n = 2**24 + 1  # torch.quantile raises above 2**24 elements
    entropy = torch.arange(n, dtype=torch.float32).view(1, n)
    keep = high_entropy_mask(entropy, torch.ones_like(entropy, dtype=torch.bool), 0.5)
    assert keep.sum().item() == 2**23 + 1  # the median is exactly 2**23; everything from it up is kept


def test_sliced_log_probs_and_entropy_are_log_softmax_bit_for_bit(monkeypatch):
    import corrpo.training.objectives as objectives

    monkeypatch.setattr(objectives, "LOG_PROB_SLICE_ELEMENTS", 3 * 11)  # 3 rows a slice: 15 rows in 5 slices
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    log_probs, entropy = objectives.token_log_probs_and_entropy(logits, targets)
    reference = logits.float().log_softmax(-1)
    expected = reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(log_probs, expected) and not entropy.requires_grad
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1).detach() / math.log(2.0))
    weights = torch.randn(3, 5)
    (grad,) = torch.autograd.grad((log_probs * weights).sum(), logits)
    (grad_reference,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert torch.equal(grad, grad_reference)
    half = logits.detach().bfloat16().requires_grad_()  # bf16 logits: fp32 math, a bf16 gradient
    lp_half, _ = objectives.token_log_probs_and_entropy(half, targets)
    assert lp_half.dtype == torch.float32
    (grad_half,) = torch.autograd.grad(lp_half.sum(), half)
    assert grad_half.dtype == torch.bfloat16


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_entropy_gradient_and_the_temperature_equal_autograd_of_the_explicit_formula(temperature):
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 11, dtype=torch.float64).float().requires_grad_(True)
    targets = torch.randint(0, 11, (3, 4))
    weights_lp, weights_h = torch.randn(3, 4), torch.randn(3, 4)
    log_probs, entropy = token_log_probs_and_entropy(logits, targets, temperature, entropy_grad=True)
    (ours,) = torch.autograd.grad((log_probs * weights_lp).sum() + (entropy * weights_h).sum(), logits)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    ref_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    ref_h = -(logp.exp() * logp).sum(-1) / math.log(2)
    torch.testing.assert_close(log_probs, ref_lp)
    torch.testing.assert_close(entropy, ref_h)
    (expected,) = torch.autograd.grad((ref_lp * weights_lp).sum() + (ref_h * weights_h).sum(), logits)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert token_log_probs_and_entropy(logits, targets)[1].grad_fn is None  # a diagnostic by default


def test_gspo_uses_one_length_normalised_ratio_per_sequence_and_delta_caps_the_unclipped_ratio():
    torch.manual_seed(4)
    logp = torch.randn(2, 5, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([0.7, -1.2])
    options = LossOptions(loss_type="grpo", importance_sampling_level="sequence", delta=1.3, epsilon_high=0.2)
    out = clipped_policy_loss(logp, old, adv, mask, options)
    m = mask.float()
    seq = torch.exp(((logp - old) * m).sum(-1) / m.sum(-1))
    capped = seq.clamp(max=1.3)
    per_seq = -torch.minimum(capped * adv, seq.clamp(0.8, 1.2) * adv)
    torch.testing.assert_close(out.loss, per_seq.mean())  # grpo: mean over tokens of a constant, then over rows
    (grad,) = torch.autograd.grad(out.loss, logp)
    (expected,) = torch.autograd.grad(per_seq.mean(), logp)
    torch.testing.assert_close(grad, expected)
