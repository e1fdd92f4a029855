"""Token entropy in bits: closed-form cases, a numpy reference, masking and the next-token alignment."""

import math

import numpy as np
import pytest
import torch

from corrpo.inversion.entropy import entropy_bits_from_logits, scored_token_entropy_bits


def test_uniform_logits_give_log2_vocab() -> None:
    logits = torch.zeros(2, 5, 64)
    ent = entropy_bits_from_logits(logits)
    assert ent.dtype == torch.float32
    torch.testing.assert_close(ent, torch.full((2, 5), math.log2(64)))


def test_one_hot_logits_give_zero() -> None:
    logits = torch.zeros(1, 3, 50)
    logits[..., 7] = 100.0
    ent = entropy_bits_from_logits(logits)
    assert ent.abs().max().item() < 1e-6


def test_matches_numpy_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 33) * 3
    ent = entropy_bits_from_logits(logits)
    x = logits.double().numpy()
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = -(p * np.log2(p)).sum(-1)
    np.testing.assert_allclose(ent.numpy(), ref, rtol=1e-5)


def test_bf16_logits_computed_in_fp32_and_sliced() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 300, 40)
    full = entropy_bits_from_logits(logits, slice_len=1000)
    sliced = entropy_bits_from_logits(logits, slice_len=7)
    torch.testing.assert_close(full, sliced)
    low = entropy_bits_from_logits(logits.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.05, rtol=0.02)


def test_scored_alignment_uses_previous_position_and_nan() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 16)
    token_mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    ent = scored_token_entropy_bits(logits, token_mask)
    plain = entropy_bits_from_logits(logits)
    assert torch.isnan(ent[:, 0]).all()  # position 0 is never scored
    for b, j in zip(*token_mask.nonzero(as_tuple=True), strict=True):
        if j >= 1:
            assert ent[b, j].item() == pytest.approx(plain[b, j - 1].item())
    expected = token_mask.clone()
    expected[:, 0] = False
    assert torch.equal(torch.isfinite(ent), expected)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="token_mask shape"):
        scored_token_entropy_bits(torch.zeros(2, 3, 4), torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(3, 7, 11), (2, 130, 50), (1, 5, 1000)])
def test_the_update_passes_entropy_is_entropy_bits_from_logits_bit_for_bit(shape):
    """The shared CorR-PO forward takes H_t from the update's log-prob pass: both call this module's
    ``entropy_bits_of_log_probs``, so they agree bit for bit."""
    from corrpo.training.objectives import token_log_probs_and_entropy

    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4
    targets = torch.zeros(shape[:-1], dtype=torch.long)
    assert torch.equal(token_log_probs_and_entropy(logits, targets)[1], entropy_bits_from_logits(logits))
