"""The batched route of K's nuclear norm (``psd_root``): Newton-Schulz ``trace(G^(1/2))`` against ``eigvalsh``."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import corrpo.inversion.strength_k as strength_k
from corrpo.inversion.psd_root import (
    _eps,
    error_bound,
    gram_nuclear,
    newton_schulz_steps,
    resolve_solver,
    trace_sqrt_batched,
)
from corrpo.inversion.strength import StrengthConfig, logit_grad_strength
from corrpo.inversion.strength_common import max_relative_error
from corrpo.inversion.strength_config import strength_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt().sum(-1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=96, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip  # d_kv 48 < d 96
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_the_step_count_is_the_fewest_whose_bound_meets_the_tolerance() -> None:
    for rank, tol in ((1, 1e-4), (48, 1e-4), (128, 1e-4), (128, 1e-5)):
        k = newton_schulz_steps(rank, tol)
        assert error_bound(rank, k) <= tol < error_bound(rank, k - 1)
    eps = _eps()
    assert all(b < a for a, b in zip(eps[1:], eps[2:], strict=False))  # the worst miss shrinks every step


def test_batched_route_meets_its_bound_on_rank_deficient_grams_with_decaying_spectra() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 48
    grams = []
    for rank in (1, 3, 17, 48):
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        lam = torch.zeros(n, dtype=torch.float64)
        lam[:rank] = torch.logspace(0, -14, rank, dtype=torch.float64)  # down to 1e-14 of the top: nearly singular
        grams.append((q * lam) @ q.mT)
    gram = torch.stack(grams) * 7.3
    ref = _reference(gram)
    est = trace_sqrt_batched(gram)
    rel = ((est - ref) / ref).abs()
    assert rel.max() <= error_bound(n, newton_schulz_steps(n, 1e-4)) <= 1e-4
    assert (est <= ref * (1 + 1e-9)).all()  # Newton-Schulz from below: an under-estimate, as the bound says
    assert trace_sqrt_batched(torch.zeros(2, n, n, dtype=torch.float64)).eq(0).all()  # a zero gradient: 0, no NaN


def test_batched_route_matches_eigvalsh_on_the_k_grams_onepass_builds(monkeypatch) -> None:
    """Every Gram the K closed form hands its solver (all three routes: short key ranges give S-square Grams of
    rank S, the rest d_kv-square ones), nearly rank-deficient as they come: within 1e-4 of eigvalsh per token."""
    seen: list[tuple[torch.Tensor, int | None]] = []

    def record(gram, solver="eigh", rank=None):
        seen.append((gram.detach().clone(), rank))
        return gram_nuclear(gram, solver, rank)

    monkeypatch.setattr(strength_k, "gram_nuclear", record)
    model = _model()
    ids = torch.randint(0, 64, (1, 160), generator=torch.Generator().manual_seed(1))
    config = StrengthConfig(projections=["k"], k_solver="eigh")
    logit_grad_strength(model, ids, None, torch.ones_like(ids, dtype=torch.bool), config)
    sizes = {g.shape[-1] for g, _ in seen}
    assert min(sizes) < 48 and 48 in sizes  # S-square (root) and d_kv-square (gram / built) Grams both checked
    worst, deficient = 0.0, 0
    for gram, rank in seen:
        ref = _reference(gram)
        lam = torch.linalg.eigvalsh(gram)
        deficient += int((lam[..., 0] < 1e-10 * lam[..., -1]).sum())
        worst = max(worst, ((trace_sqrt_batched(gram, rank) - ref) / ref).abs().max().item())
    assert deficient > 0  # nearly rank-deficient Grams are among them
    assert worst <= 1e-4


def test_onepass_with_the_batched_k_solver_matches_the_loop() -> None:
    model = _model()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    scored = mask.bool()
    loop = logit_grad_strength(model, ids, mask, scored, StrengthConfig(projections=["k"], method="loop"))
    fast = logit_grad_strength(model, ids, mask, scored, StrengthConfig(projections=["k"], k_solver="batched"))
    assert max_relative_error(fast, loop) <= 1e-4  # a sequence's first token: exactly 0, the floor of that helper


def test_k_solver_is_validated_and_auto_takes_eigh_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="strength: unknown k_solver 'qr'"):
        strength_spec({"k_solver": "qr"}, "strength")
    assert resolve_solver("auto", torch.device("cpu")) == "eigh"
    assert resolve_solver("auto", torch.device("cuda")) == "batched"
    assert resolve_solver("batched", torch.device("cpu")) == "batched"
