"""Per-token logit-gradient strengths: every fast method against the loop, the loop against brute force."""

import copy

import pytest
import torch
from strength_checks import assert_close, padded_batch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, Qwen2Config

from corrpo.inversion.entropy import scored_token_entropy_bits
from corrpo.inversion.strength import StrengthConfig, logit_grad_strength, score_tokens
from corrpo.inversion.strength_common import (
    ScoringBatch,
    forward_hidden_and_z,
)
from corrpo.inversion.strength_sketch import rademacher_directions, sketch_squared_norms
from corrpo.models.architectures import decoder_parts, select_weights
from corrpo.models.forward import position_ids_from_mask

VOCAB, T = 64, 12
_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(arch: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**_SHAPE)
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    # non-trivial norms so a mix-up of the normed and raw inputs would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return _tiny(request.param)


def _batch(padding: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return padded_batch(VOCAB, T, padding)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("measure", ["nuclear", "frobenius", "l1"])
def test_fast_methods_match_loop_last_layer(model: torch.nn.Module, padding: str, measure: str) -> None:
    ids, attn, token_mask = _batch(padding)
    for proj in (("q",), ("k",), ("v",), ("o",), ("mlp",), ("q", "k", "v", "o")):
        ref = logit_grad_strength(
            model, ids, attn, token_mask, StrengthConfig(measure, projections=proj, method="loop")
        )
        assert ref.shape == ids.shape and ref.dtype == torch.float32
        assert torch.isfinite(ref).sum() > 10
        for method in ("onepass", "vmap"):
            cfg = StrengthConfig(measure, projections=proj, method=method, chunk_size=5)
            assert_close(logit_grad_strength(model, ids, attn, token_mask, cfg), ref)


@pytest.mark.parametrize("layers", ["all", [0], [-2, -1]])
def test_vmap_matches_loop_any_layers(model: torch.nn.Module, layers: object) -> None:
    ids, attn, token_mask = _batch("left")
    for measure in ("nuclear", "l1"):
        kw = dict(measure=measure, layers=layers, projections=("q", "k", "v", "o", "mlp"))
        ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
        got = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="vmap", chunk_size=7))
        assert_close(got, ref)


def test_unscored_positions_are_nan_and_predecessor_padding_dropped() -> None:
    model = _tiny("qwen2")
    ids, attn, token_mask = _batch("left")
    s = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=("o",)))
    assert torch.isnan(s[:, 0]).all() and torch.isnan(s[1, 5])
    assert torch.isnan(s[0, 4])  # first real token: its predecessor is padding
    assert torch.isfinite(s[0, 5:]).all()


def test_layer_list_and_empty_mask() -> None:
    model = _tiny("llama")
    ids, attn, token_mask = _batch("right")
    last = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(method="onepass"))
    listed = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(method="onepass", layers=[-1]))
    torch.testing.assert_close(last, listed, equal_nan=True)
    none = torch.zeros_like(token_mask)
    for method in ("loop", "onepass", "vmap"):
        ent, s = score_tokens(model, ids, attn, none, StrengthConfig(method=method))
        assert torch.isnan(s).all() and torch.isnan(ent).all()


def test_q_k_gradients_vanish_at_first_real_position() -> None:
    """A single-key attention row has a zero softmax Jacobian, so dz/dW_q = dz/dW_k = 0 exactly there."""
    model = _tiny("qwen2")
    ids, attn, token_mask = _batch("right")
    for proj in ("q", "k"):
        s = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=(proj,)))
        assert s[:, 1].abs().max().item() < 1e-6 * s[:, 2:].nan_to_num().max().item()


def test_z_is_the_models_raw_logit(model: torch.nn.Module) -> None:
    for padding in ("left", "right"):
        ids, attn, token_mask = _batch(padding)
        batch = ScoringBatch.build(ids, attn, token_mask)
        with torch.no_grad():
            _, z = forward_hidden_and_z(decoder_parts(model), batch)
            logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
        ref = logits[batch.rows, batch.cols - 1, ids[batch.rows, batch.cols]]
        torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)


def test_loop_matches_brute_force_backward(model: torch.nn.Module) -> None:
    ids, attn, token_mask = _batch("left")
    b, j = 0, 8
    one = torch.zeros_like(token_mask)
    one[b, j] = True
    for layers, proj in (("last", ("q", "k", "v", "o")), ([0], ("v", "mlp"))):
        cfg = StrengthConfig("nuclear", layers=layers, projections=proj, method="loop")
        got = logit_grad_strength(model, ids, attn, one, cfg)[b, j].item()
        fresh = copy.deepcopy(model)
        logits = fresh(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
        logits[b, j - 1, ids[b, j]].backward()
        norms = [torch.linalg.matrix_norm(p.grad, ord="nuc") for _, p in select_weights(fresh, layers, proj)]
        assert got == pytest.approx(torch.stack(norms).mean().item(), rel=1e-5)


def test_score_tokens_entropy_matches_logits(model: torch.nn.Module) -> None:
    ids, attn, token_mask = _batch("right")
    ent, s = score_tokens(model, ids, attn, token_mask, StrengthConfig(), slice_len=4)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    ref = scored_token_entropy_bits(logits, ScoringBatch.build(ids, attn, token_mask).mask)
    torch.testing.assert_close(ent, ref, equal_nan=True)
    assert torch.equal(torch.isfinite(ent), torch.isfinite(s))


def test_state_restored_no_grad_left_and_frozen_models_work() -> None:
    model = _tiny("llama")
    ids, attn, token_mask = _batch("left")
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for method in ("loop", "onepass", "vmap"):
        logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(method=method))
        assert model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
    frozen = _tiny("qwen2").requires_grad_(False)
    ref = logit_grad_strength(frozen, ids, attn, token_mask, StrengthConfig(method="loop"))
    assert_close(logit_grad_strength(frozen, ids, attn, token_mask, StrengthConfig(method="onepass")), ref)
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():  # callers inside no_grad still get gradients
        assert_close(logit_grad_strength(frozen, ids, attn, token_mask, StrengthConfig(method="vmap")), ref)
    with torch.inference_mode():  # ... and so do callers inside inference_mode (Lightning validation)
        ids_inf, attn_inf, mask_inf = ids.clone(), attn.clone(), token_mask.clone()
        _, got = score_tokens(frozen, ids_inf, attn_inf, mask_inf, StrengthConfig(method="onepass"))
    assert_close(got, ref)


def test_eager_attention_gives_same_result() -> None:
    ids, attn, token_mask = _batch("left")
    sdpa = logit_grad_strength(_tiny("qwen2"), ids, attn, token_mask, StrengthConfig(method="loop"))
    eager = _tiny("qwen2", attn="eager")
    assert_close(logit_grad_strength(eager, ids, attn, token_mask, StrengthConfig(method="onepass")), sdpa)
    assert_close(logit_grad_strength(eager, ids, attn, token_mask, StrengthConfig(method="vmap")), sdpa)


def test_unsupported_architecture_raises() -> None:
    """Bloom is no listed family and fuses q/k/v under a name the generic layout does not read."""
    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2))
    ids, attn, token_mask = _batch("left")
    with pytest.raises(ValueError, match="BloomForCausalLM"):
        logit_grad_strength(bloom, ids, attn, token_mask, StrengthConfig(method="loop"))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="layers='all'"):
        StrengthConfig(method="onepass", layers="all")
    with pytest.raises(ValueError, match="unknown measure"):
        StrengthConfig(measure="spectral")
    with pytest.raises(ValueError, match="unknown method"):
        StrengthConfig(method="magic")
    with pytest.raises(ValueError, match="projections"):
        StrengthConfig(projections=("q", "x"))
    with pytest.raises(ValueError, match="layers"):
        StrengthConfig(layers="first")
    with pytest.raises(ValueError, match="chunk_size"):
        StrengthConfig(chunk_size=0)
    ids, attn, token_mask = _batch("left")
    with pytest.raises(ValueError, match="last layer"):
        logit_grad_strength(_tiny("qwen2"), ids, attn, token_mask, StrengthConfig(method="onepass", layers=[0]))
    with pytest.raises(ValueError, match="out of range"):
        logit_grad_strength(_tiny("qwen2"), ids, attn, token_mask, StrengthConfig(method="vmap", layers=[5]))


# ------------------------------------------------------------------------------------------- sketch
def test_sketch_with_the_standard_basis_as_directions_is_exact(model: torch.nn.Module) -> None:
    """Summing <dz/dW, E_ij>^2 over every basis matrix E_ij is ||dz/dW||_F^2 exactly: the JVP machinery."""
    ids, attn, token_mask = _batch("left")
    batch = ScoringBatch.build(ids, attn, token_mask)
    # layer 0's K: its tangent passes RoPE, the attention mixing and every later layer
    for layer, projection in ((0, "k"), (0, "o"), (1, "q"), (1, "v")):
        config = StrengthConfig("frobenius", [layer], (projection,), "loop")
        ref = logit_grad_strength(model, ids, attn, token_mask, config)
        ((_, weight),) = select_weights(model, [layer], (projection,))
        basis = torch.eye(weight.numel()).view(weight.numel(), *weight.shape)
        assert_close(batch.scatter(sketch_squared_norms(model, batch, weight, basis, chunk_size=256).sqrt()), ref)


def test_sketch_squared_norm_estimates_are_unbiased(model: torch.nn.Module) -> None:
    ids, attn, token_mask = _batch("right")
    batch = ScoringBatch.build(ids, attn, token_mask)
    ((_, weight),) = select_weights(model, "last", ("v",))
    exact = sketch_squared_norms(model, batch, weight, torch.eye(weight.numel()).view(-1, *weight.shape))
    k = 400
    directions = rademacher_directions(weight, k, torch.Generator().manual_seed(7))
    ratio = sketch_squared_norms(model, batch, weight, directions) / k / exact
    # each token's estimate has relative std <= sqrt(2/k) = 0.07; their mean over ~20 tokens is tighter still
    assert (ratio - 1).abs().max() < 5 * (2 / k) ** 0.5
    assert abs(ratio.mean().item() - 1) < 2 * (2 / k) ** 0.5


def test_sketch_tracks_loop_frobenius_over_all_layers_and_is_reproducible(model: torch.nn.Module) -> None:
    ids, attn, token_mask = _batch("left")
    kw = dict(measure="frobenius", layers="all", projections=("q", "k", "v", "o", "mlp"))
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
    got = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="sketch", sketch_dim=64))
    scored = ~ref.isnan()
    assert torch.equal(scored, ~got.isnan())
    # each matrix's sqrt(estimate) has relative std ~ sqrt(1 / (2k)); S averages 14 of them
    error = ((got[scored] - ref[scored]) / ref[scored]).abs()
    assert error.median() < (1 / (2 * 64)) ** 0.5 and error.max() < 4 * (1 / (2 * 64)) ** 0.5
    again = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="sketch", sketch_dim=64))
    other = StrengthConfig(**kw, method="sketch", sketch_dim=64, sketch_seed=1)
    assert torch.equal(got[scored], again[scored])
    assert not torch.equal(got[scored], logit_grad_strength(model, ids, attn, token_mask, other)[scored])


def test_sketch_restores_the_model_and_refuses_other_measures() -> None:
    model = _tiny("llama").train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, attn, token_mask = _batch("left")
    entropy, _ = score_tokens(model, ids, attn, token_mask, StrengthConfig("frobenius", method="sketch", sketch_dim=2))
    ref, _ = score_tokens(model, ids, attn, token_mask, StrengthConfig(method="onepass"))
    assert torch.equal(entropy.isnan(), ref.isnan()) and torch.allclose(entropy, ref, equal_nan=True)
    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="measure='frobenius'"):
        StrengthConfig(method="sketch")
    with pytest.raises(ValueError, match="sketch_dim"):
        StrengthConfig("frobenius", method="sketch", sketch_dim=0)


def test_sketch_falls_back_to_one_jvp_per_direction_with_the_same_result(monkeypatch) -> None:
    import corrpo.inversion.strength_sketch as sketch

    model = _tiny("qwen2")
    ids, attn, token_mask = _batch("left")
    config = StrengthConfig("frobenius", projections=("q", "v"), method="sketch", sketch_dim=8, chunk_size=3)
    batched = logit_grad_strength(model, ids, attn, token_mask, config)

    def no_batching_rule(*args, **kwargs):
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setattr(sketch, "vmap", lambda fn: no_batching_rule)
    monkeypatch.setattr(sketch, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="one JVP per direction"):
        one_by_one = logit_grad_strength(model, ids, attn, token_mask, config)
    assert_close(one_by_one, batched, tol=1e-5)


@pytest.mark.parametrize("route", ["gram", "root", "built"])
@pytest.mark.parametrize("positions", [5, 40])  # fewer than both sides, and more
@pytest.mark.parametrize("measure", ["nuclear", "frobenius", "l1"])
def test_k_measure_equals_the_norm_of_the_built_matrix(positions, measure, route) -> None:
    from corrpo.inversion.strength_kv import k_measure

    gen = torch.Generator().manual_seed(positions)
    gk = torch.randn(6, positions, 16, generator=gen, dtype=torch.float64)
    x = torch.randn(positions, 24, generator=gen, dtype=torch.float64)
    gk[:, positions // 2 :] = 0  # causal: later positions of a block carry no gradient for early tokens
    mat = torch.einsum("nse,sd->ned", gk, x)
    ord_ = {"nuclear": "nuc", "frobenius": "fro"}.get(measure)
    expected = mat.abs().sum((-2, -1)) if measure == "l1" else torch.linalg.matrix_norm(mat, ord=ord_)
    route = "built" if measure == "l1" else route  # the l1 norm needs the entries
    assert torch.allclose(k_measure(gk.float(), x.float(), measure, route).double(), expected, rtol=1e-5)


def test_the_k_route_is_the_s_square_problem_for_short_key_ranges_and_the_built_matrix_for_long_ones() -> None:
    from corrpo.inversion.strength_kv import k_route

    d_kv, d = 64, 128
    assert k_route(8, d_kv, d, "nuclear") == "root"  # S < d_kv: the S-square eigen-solve is the smallest
    assert k_route(72, d_kv, d, "nuclear") == "gram"  # d_kv < S well below d: B^T K B, no root, no d_kv x d product
    assert k_route(4000, d_kv, d, "nuclear") == "built"  # S >> d: building M is cheaper than S^2 d_kv
    assert k_route(8, d_kv, d, "l1") == "built"
