"""Clip-Cov and KL-Cov against hand-computed covariances, selections and losses."""

import math

import pytest
import torch

from corrpo.training.covariance_tokens import clip_cov_tokens, kl_cov_tokens, token_covariance
from corrpo.training.objectives import LossOptions, clipped_policy_loss

ADV = torch.tensor([1.0, -1.0])
LOGP = torch.tensor([[-1.0, -2.0], [-3.0, -9.0]])
MASK = torch.tensor([[True, True], [True, False]])


def test_token_covariance_by_hand():
    # over the 3 loss tokens: mean A = (1 + 1 - 1) / 3 = 1/3, mean logp = (-1 - 2 - 3) / 3 = -2
    cov = token_covariance(ADV, LOGP, MASK)
    expected = torch.tensor([[(2 / 3) * 1.0, (2 / 3) * 0.0], [(-4 / 3) * -1.0, -math.inf]])
    torch.testing.assert_close(cov, expected)
    torch.testing.assert_close(token_covariance(ADV.unsqueeze(1).expand(2, 2), LOGP, MASK), cov)


def test_kl_cov_picks_the_largest_covariances_at_least_one():
    cov = token_covariance(ADV, LOGP, MASK)
    assert kl_cov_tokens(cov, MASK, 0.5).tolist() == [[False, False], [True, False]]  # int(1.5) = 1
    assert kl_cov_tokens(cov, MASK, 1e-9).sum() == 1  # never fewer than one
    assert kl_cov_tokens(cov, MASK, 1.0).tolist() == MASK.tolist()


def test_clip_cov_draws_among_the_unclipped_tokens_inside_the_bounds():
    gen = torch.Generator().manual_seed(0)
    cov = torch.tensor([[0.5, 1.5, 2.0, 6.0], [3.0, 4.0, 1.2, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    stopped = torch.tensor([[False, False, True, False], [False, False, False, False]])
    candidates = {(0, 1), (1, 0), (1, 1)}  # inside (1, 5), in the mask, not stopped by the clip
    for ratio, count in ((0.2, 1), (0.3, 2), (1.0, 3)):  # int(ratio * 7 tokens), at least 1, at most 3
        chosen = clip_cov_tokens(cov, mask, stopped, ratio, 1.0, 5.0, generator=gen)
        picked = {tuple(i) for i in chosen.nonzero().tolist()}
        assert len(picked) == count and picked <= candidates
    none = clip_cov_tokens(cov, mask, torch.ones_like(mask), 1.0, 1.0, 5.0)
    assert not none.any()
    a = clip_cov_tokens(cov, mask, stopped, 0.2, 1.0, 5.0, generator=torch.Generator().manual_seed(3))
    b = clip_cov_tokens(cov, mask, stopped, 0.2, 1.0, 5.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_clip_cov_removes_the_gradient_of_the_chosen_tokens_only():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    old = log_probs.detach().clone()
    old[0, 0] -= 1.0  # ratio e > 1 + eps with A > 0: the clip stops this token already
    mask = torch.ones(2, 3, dtype=torch.bool)
    advantages = torch.tensor([1.0, -2.0])
    options = LossOptions(policy_loss="clip_cov", cov_ratio=1.0, clip_cov_bounds=(-100.0, 100.0))
    out = clipped_policy_loss(log_probs, old, advantages, mask, options)
    out.loss.backward()
    # every token but the clipped one is chosen: nothing keeps a gradient (the clipped one has none either)
    assert torch.count_nonzero(log_probs.grad) == 0
    assert out.cov_selected.item() == pytest.approx(5 / 6)
    plain = log_probs.detach().clone().requires_grad_(True)
    reference = clipped_policy_loss(plain, old, advantages, mask, LossOptions(policy_loss="clip"))
    reference.loss.backward()
    assert torch.count_nonzero(plain.grad) == 5 and reference.cov_selected is None


def test_kl_cov_by_hand_off_policy_and_plain_gradient_on_policy():
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0], [-0.5, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0])
    out = clipped_policy_loss(
        log_probs, old, advantages, mask, LossOptions(policy_loss="kl_cov", cov_ratio=1.0, kl_cov_coef=0.5)
    )
    ratio = torch.exp(log_probs.detach() - old)
    expected = (-advantages.unsqueeze(1) * ratio + 0.5 * (log_probs.detach() - old).abs()).mean()
    assert out.loss.item() == pytest.approx(expected.item())  # every token chosen, no clip anywhere
    on_policy = log_probs.detach().clone().requires_grad_(True)
    out = clipped_policy_loss(
        on_policy, on_policy.detach(), advantages, mask, LossOptions(policy_loss="kl_cov", cov_ratio=1.0)
    )
    out.loss.backward()
    torch.testing.assert_close(on_policy.grad, -advantages.unsqueeze(1).expand(2, 2) / 4)


def test_unknown_policy_loss_is_refused():
    with pytest.raises(ValueError, match="policy_loss"):
        clipped_policy_loss(LOGP, LOGP, ADV, MASK, LossOptions(policy_loss="ppo2"))
