"""CorR-PO reward term: the bonus arithmetic, its config, and per-response correlations on a tiny Qwen2."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from corrpo.inversion.strength import score_tokens
from corrpo.models.loading import TinyArchitecture, load_policy
from corrpo.training.corrpo_term import CorrPOTermConfig, corrpo_bonus, rollout_correlations

NAN = float("nan")


def _bonus(rho, n=None, coef=1.0, min_tokens=2, group_size=None, center=False):
    rho = torch.tensor(rho, dtype=torch.float64)
    n = torch.full_like(rho, 10, dtype=torch.long) if n is None else torch.tensor(n)
    return corrpo_bonus(rho, n, coef, min_tokens, group_size or len(rho), center)


# ------------------------------------------------------------------------------------------------ bonus
def test_negative_rho_earns_positive_bonus():
    bonus, valid = _bonus([-0.6, 0.4, 0.0], coef=0.5)
    assert bonus.dtype == torch.float32 and valid.all()
    torch.testing.assert_close(bonus, torch.tensor([0.3, -0.2, 0.0]))


def test_bonus_is_clipped_to_coef():
    bonus, _ = _bonus([-1.5, 1.2, -1.0], coef=2.0)
    torch.testing.assert_close(bonus, torch.tensor([2.0, -2.0, 2.0]))


def test_min_tokens_and_nan_rows_are_invalid_and_zero():
    bonus, valid = _bonus([-0.5, -0.5, NAN, math.inf], n=[8, 7, 20, 20], min_tokens=8)
    assert valid.tolist() == [True, False, False, False]
    assert bonus.tolist() == [0.5, 0.0, 0.0, 0.0]
    assert torch.isfinite(bonus).all()


def test_centring_by_hand():
    rho = [-0.8, -0.2, NAN, 0.4, -0.5, 0.1, 0.3, -0.9]
    bonus, valid = _bonus(rho, n=[9, 9, 9, 1, 9, 9, 9, 9], coef=0.5, min_tokens=2, group_size=4, center=True)
    # group 0: valid 0.8, 0.2 -> mean 0.5; group 1: 0.5, -0.1, -0.3, 0.9 -> mean 0.25
    expected = [0.5 * (0.8 - 0.5), 0.5 * (0.2 - 0.5), 0.0, 0.0, 0.5 * 0.25, 0.5 * -0.35, 0.5 * -0.55, 0.5 * 0.65]
    assert valid.tolist() == [True, True, False, False, True, True, True, True]
    torch.testing.assert_close(bonus, torch.tensor(expected), atol=1e-7, rtol=0)
    assert abs(bonus[4:].sum()) < 1e-6 and abs(bonus[:2].sum()) < 1e-6


def test_all_invalid_group_stays_zero_when_centred():
    bonus, valid = _bonus([NAN, NAN, -0.5, 0.5], group_size=2, center=True)
    assert bonus.tolist() == [0.0, 0.0, 0.5, -0.5] and valid.tolist() == [False, False, True, True]


def test_coef_zero_gives_exact_zeros():
    bonus, valid = _bonus([-0.7, 0.3, NAN, 1.0], coef=0.0, center=True)
    assert torch.equal(bonus, torch.zeros(4)) and valid.tolist() == [True, True, False, True]


def test_bonus_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        _bonus([0.1, 0.2, 0.3], group_size=2)
    with pytest.raises(ValueError, match=r"\[N\]"):
        corrpo_bonus(torch.zeros(2, 2), torch.zeros(2, 2), 1.0, 2, 2)


# ----------------------------------------------------------------------------------------------- config
def test_warmup_schedule():
    config = CorrPOTermConfig(coef=0.4, warmup_steps=4)
    assert [config.coef_at(s) for s in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert CorrPOTermConfig(coef=0.4).coef_at(0) == 0.4
    assert CorrPOTermConfig().coef_at(10) == 0.0


def test_a_partial_strength_section_keeps_the_reward_defaults():
    strength = CorrPOTermConfig(strength={"measure": "l1", "layers": [-1], "chunk_size": 7}).strength
    assert (strength.measure, strength.layers, strength.chunk_size) == ("l1", (-1,), 7)
    assert strength.projections == ("q", "v", "o")  # REWARD_STRENGTH_DEFAULTS, not the tracker's q, k, v, o
    given = {"measure": "frobenius", "layers": "all", "method": "sketch", "sketch_dim": 5}
    sketch = CorrPOTermConfig(strength=given).strength
    assert (sketch.method, sketch.layers, sketch.sketch_dim) == ("sketch", "all", 5)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"coef": -0.1}, "coef"),
        ({"coef": math.nan}, "coef"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"correlation": "kendall"}, "correlation"),
        ({"strength": {"measure": "spectral"}}, "strength"),
        ({"strength": {"method": "magic"}}, "strength"),
        ({"strength": {"layers": "first"}}, "strength"),
        ({"strength": {"layers": []}}, "strength"),
        ({"strength": {"projections": ["q", "x"]}}, "strength"),
        ({"strength": {"chunk_size": 0}}, "strength"),
        ({"min_tokens": 1}, "min_tokens"),
        ({"strength": {"layers": "all"}}, "strength"),  # onepass is last-layer only
        ({"strength": {"method": "sketch"}}, "strength"),  # sketch estimates Frobenius norms only
        ({"strength": {"measures": "l1"}}, "strength"),  # a misspelt field
        ({"strength": {"sketch_dim": 0}}, "strength"),
    ],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=rf"rl\.inversion\.{key}"):
        CorrPOTermConfig(**kwargs)


# --------------------------------------------------------------------------------- correlations on a model
@pytest.fixture(scope="module")
def tiny_model():
    """A random tiny Qwen2 with sharpened (tied) embeddings.

    At a random init every entropy is ~log2 V to within 1e-3 bits, so fp32 rounding (which differs between a
    padded batch and a lone row) moves Pearson's r by 1e-4; scaling the embeddings spreads the entropies.
    """
    model, _ = load_policy("tiny-qwen2", TinyArchitecture(hidden_size=32, num_hidden_layers=2, intermediate_size=64))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)
    return model


def _left_padded_rollout(vocab: int, prompt_lens, completion_lens, pad: int = 0):
    """Random ``[prompt | completion]`` rows, prompts left-padded to P, completions right-padded to L."""
    gen = torch.Generator().manual_seed(0)
    P, L = max(prompt_lens), max(completion_lens)
    n = len(prompt_lens)
    ids = torch.full((n, P + L), pad, dtype=torch.long)
    mask = torch.zeros(n, P + L, dtype=torch.long)
    comp = torch.zeros(n, P + L, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        ids[i, P - p : P + c] = torch.randint(4, vocab, (p + c,), generator=gen)
        mask[i, P - p : P + c] = 1
        comp[i, P : P + c] = True
    return ids, mask, comp


def _reference(model, ids, mask, comp, config, i):
    """Response ``i`` alone, padding stripped: score_tokens then scipy."""
    real = mask[i].bool()
    entropy, strength = score_tokens(model, ids[i, real][None], None, comp[i, real][None], config.strength)
    e, s = entropy[0].double().numpy(), strength[0].double().numpy()
    keep = np.isfinite(e) & np.isfinite(s)
    if keep.sum() < 2:
        return NAN, int(keep.sum()), entropy[0], strength[0]
    corr = stats.spearmanr if config.correlation == "spearman" else stats.pearsonr
    return float(corr(e[keep], s[keep])[0]), int(keep.sum()), entropy[0], strength[0]


@pytest.mark.parametrize("correlation", ["spearman", "pearson"])
def test_rollout_correlations_match_per_response_reference(tiny_model, correlation):
    vocab = tiny_model.config.vocab_size
    ids, mask, comp = _left_padded_rollout(vocab, [3, 7, 5, 2, 6], [12, 9, 1, 15, 6])
    config = CorrPOTermConfig(coef=1.0, correlation=correlation)
    rho, n_tokens, entropy, strength = rollout_correlations(tiny_model, ids, mask, comp, config, rows_per_chunk=2)
    assert entropy.shape == strength.shape == ids.shape
    assert rho.dtype == torch.float64 and n_tokens.dtype == torch.long
    assert n_tokens.tolist() == [12, 9, 1, 15, 6]
    assert math.isnan(rho[2])  # a single completion token: no correlation
    for i in range(len(rho)):
        ref, n_ref, entropy_ref, strength_ref = _reference(tiny_model, ids, mask, comp, config, i)
        assert n_tokens[i] == n_ref
        real = mask[i].bool()  # the per-token values the correlation saw, in the rollout's own columns
        torch.testing.assert_close(entropy[i, real], entropy_ref, equal_nan=True)
        torch.testing.assert_close(strength[i, real], strength_ref, equal_nan=True, rtol=1e-5, atol=0)
        assert entropy[i, ~real].isnan().all() and strength[i, ~real].isnan().all()
        if math.isnan(ref):
            assert math.isnan(rho[i])
        else:
            assert rho[i].item() == pytest.approx(ref, abs=1e-6)
    assert torch.isfinite(rho[[0, 1, 3, 4]]).all()
    bonus, valid = corrpo_bonus(rho, n_tokens, 0.5, 8, group_size=5, center=False)
    assert valid.tolist() == [True, True, False, True, False] and torch.isfinite(bonus).all()


def test_rollout_correlations_leave_model_state_alone(tiny_model):
    ids, mask, comp = _left_padded_rollout(tiny_model.config.vocab_size, [2, 4], [5, 8])
    tiny_model.train()
    rho, *_ = rollout_correlations(tiny_model, ids, mask, comp, CorrPOTermConfig(coef=1.0))
    assert tiny_model.training and all(p.grad is None for p in tiny_model.parameters())
    assert rho.shape == (2,)
