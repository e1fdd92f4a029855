"""Inversion anatomy: every factor product against autograd / the loop strength, on every family with a final norm."""

import copy

import pytest
import torch
from conftest import TINY_ARCH
from strength_checks import padded_batch

from corrpo.inversion.anatomy import final_norm_factors, norm_logit_gradient, token_anatomy
from corrpo.inversion.strength import StrengthConfig, logit_grad_strength
from corrpo.inversion.strength_common import (
    ScoringBatch,
    forward_hidden_and_z,
    matrix_measure,
    max_relative_error,
    scoring_mode,
)
from corrpo.models.architectures import decoder_parts, select_matrices
from corrpo.models.tiny_families import TINY_FAMILY_NAMES, random_family_model

VOCAB, T = 64, 12
TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=TINY_FAMILY_NAMES)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return random_family_model(request.param, VOCAB, TINY_ARCH)


def autograd_dz_dh(model: torch.nn.Module, ids, attn, token_mask) -> torch.Tensor:
    """``|dz_n / dh|`` per scored token, ``h`` the final norm's input: one backward per token (the reference)."""
    parts = decoder_parts(model)
    norm = getattr(parts.base, parts.layout.final_norm)
    seen = {}
    handle = norm.register_forward_hook(lambda _m, args, _out: seen.update(h=args[0]))
    batch = ScoringBatch.build(ids, attn, token_mask)
    try:
        with scoring_mode(model, list(model.parameters())):
            _, z = forward_hidden_and_z(parts, batch)
            norms = [torch.autograd.grad(z[n], seen["h"], retain_graph=True)[0].norm() for n in range(z.shape[0])]
    finally:
        handle.remove()
    return batch.scatter(torch.stack(norms))


def per_mlp_matrix_loop(model: torch.nn.Module, ids, attn, token_mask) -> dict[str, torch.Tensor]:
    """Nuclear norm of each last-layer MLP matrix's ``dz_n/dW``, one backward per token (the config averages them)."""
    parts = decoder_parts(model)
    matrices = [m for m in select_matrices(model, "last", ("mlp",)) if not m.experts]  # experts: no rank-1 factors
    if not matrices:
        return {}
    batch = ScoringBatch.build(ids, attn, token_mask)
    out = {m.name.rsplit(".", 1)[1]: torch.empty(batch.num_scored) for m in matrices}
    with scoring_mode(model, [m.weight for m in matrices]):
        _, z = forward_hidden_and_z(parts, batch)
        for n in range(z.shape[0]):
            grads = torch.autograd.grad(z[n], [m.weight for m in matrices], retain_graph=True)
            for m, g in zip(matrices, grads, strict=True):
                out[m.name.rsplit(".", 1)[1]][n] = matrix_measure(m.gradient(g), "nuclear")
    return {k: batch.scatter(v) for k, v in out.items()}


def test_final_norm_factors_multiply_to_autograd_dz_dh(model: torch.nn.Module) -> None:
    ids, attn, token_mask = padded_batch(VOCAB, T, "left")
    got = token_anatomy(model, ids, attn, token_mask)
    product = got["inv_rms"] * got["w_norm"] * got["sin"] * got["logit_slope"]
    ref = autograd_dz_dh(model, ids, attn, token_mask)
    assert torch.isfinite(ref).sum() > 10
    assert max_relative_error(product, ref) <= TOL
    assert max_relative_error(got["dz_dh"], ref) <= TOL


def test_rank1_factors_multiply_to_the_loop_strength(model: torch.nn.Module) -> None:
    ids, attn, token_mask = padded_batch(VOCAB, T, "right")
    got = token_anatomy(model, ids, attn, token_mask)
    for proj in ("q", "o"):
        ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=(proj,), method="loop"))
        assert max_relative_error(got[f"{proj}_grad"] * got[f"{proj}_act"], ref) <= TOL, proj
    for proj, ref in per_mlp_matrix_loop(model, ids, attn, token_mask).items():
        assert max_relative_error(got[f"{proj}_grad"] * got[f"{proj}_act"], ref) <= TOL, proj
    # O's chain: |g_t| = |dz/dh_t| * path gain
    defined = torch.isfinite(got["path_gain"])  # NaN only where dz/dh_t = 0 (a zero unembedding row)
    assert defined.sum() > 10 and (got["dz_dh"][got["o_grad"].isfinite() & ~defined] == 0).all()
    chain = torch.where(defined, got["dz_dh"] * got["path_gain"], torch.nan)
    assert max_relative_error(chain, torch.where(defined, got["o_grad"], torch.nan)) <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_without_the_mlp_o_reaches_h_through_the_residual_alone(family: str) -> None:
    model = random_family_model(family, VOCAB, TINY_ARCH)
    with torch.no_grad():
        decoder_parts(model).layers[-1].mlp.down_proj.weight.zero_()
    got = token_anatomy(model, *padded_batch(VOCAB, T, "left"))
    fin = torch.isfinite(got["path_gain"])
    torch.testing.assert_close(got["path_gain"][fin], torch.ones(int(fin.sum())), rtol=TOL, atol=TOL)
    assert got["mlp_path"][fin].abs().max() <= TOL
    # and with it, the MLP branch is really there
    full = token_anatomy(random_family_model(family, VOCAB, TINY_ARCH), *padded_batch(VOCAB, T, "left"))
    assert full["mlp_path"][fin].min() > 1e-3


@pytest.mark.parametrize("centred", [False, True])
def test_norm_gradient_closed_form_matches_autograd_and_sin_is_the_angle(centred: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    h, u, eps = torch.randn(5, 16, generator=gen, dtype=torch.float64), torch.randn(5, 16, generator=gen), 1e-6

    def logit(hh: torch.Tensor) -> torch.Tensor:
        x = hh - hh.mean(-1, keepdim=True) if centred else hh
        return (x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * u.double()).sum()

    hv = h.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(logit(hv), hv)
    torch.testing.assert_close(norm_logit_gradient(h, u, eps, centred), ref, rtol=1e-10, atol=1e-12)
    f = final_norm_factors(h, u, eps, centred)
    torch.testing.assert_close((f["inv_rms"] * f["w_norm"] * f["sin"]).double(), ref.norm(dim=-1), rtol=1e-6, atol=0)
    # h along u: the norm cancels that direction (sin ~ 0); h orthogonal to u: sin = 1
    uc = u - u.mean(-1, keepdim=True) if centred else u
    assert final_norm_factors(3 * uc, u, 0.0, centred)["sin"].max() < 1e-3
    ortho = torch.randn(5, 16, generator=gen)
    ortho = ortho - (ortho * uc).sum(-1, keepdim=True) / uc.square().sum(-1, keepdim=True) * uc
    if centred:
        ortho = ortho - ortho.mean(-1, keepdim=True)
    torch.testing.assert_close(final_norm_factors(ortho, u, 0.0, centred)["sin"], torch.ones(5), rtol=1e-5, atol=1e-5)


def test_a_family_without_final_norm_is_refused_by_name() -> None:
    model = copy.deepcopy(random_family_model("llama", VOCAB, TINY_ARCH))
    del model.model.norm
    with pytest.raises(ValueError, match="llama family has no final norm"):
        token_anatomy(model, *padded_batch(VOCAB, T, "left"))
