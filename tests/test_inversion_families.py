"""Every listed decoder family: each strength method against the loop, per matrix; fused blocks against
separately parametrised blocks; the raw logit against the model's own output; unlisted models."""

import copy
import dataclasses

import pytest
import torch
from conftest import TINY_ARCH
from strength_checks import assert_close, padded_batch, spearman_flip_bound
from torch.func import functional_call
from transformers import AutoModelForCausalLM, FalconConfig, OPTConfig

import corrpo.models.architectures as architectures
from corrpo.inversion.strength import StrengthConfig, logit_grad_strength
from corrpo.inversion.strength_common import (
    ScoringBatch,
    forward_hidden_and_z,
    max_relative_error,
)
from corrpo.inversion.strength_sketch import _support, sketch_squared_norms
from corrpo.models.architectures import decoder_parts, select_matrices
from corrpo.models.families import FamilyLayout, Slot, find_layout
from corrpo.models.forward import position_ids_from_mask
from corrpo.models.tiny_families import TINY_FAMILY_NAMES, random_family_model

VOCAB, T = 64, 12
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_family_model(family: str) -> torch.nn.Module:
    return random_family_model(family, VOCAB, TINY_ARCH)


def _batch(padding: str = "left") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return padded_batch(VOCAB, T, padding)


@pytest.fixture(scope="module", params=TINY_FAMILY_NAMES)
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_family_model(request.param)


def test_every_method_matches_loop_for_every_matrix(model: torch.nn.Module) -> None:
    ids, attn, token_mask = _batch("left")
    for proj in (("q",), ("k",), ("v",), ("o",), ("mlp",)):
        ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=proj, method="loop"))
        assert torch.isfinite(ref).sum() > 10 and (ref[torch.isfinite(ref)] > 0).any()
        for method in ("vmap", "onepass"):
            cfg = StrengthConfig(projections=proj, method=method, chunk_size=5)
            assert_close(logit_grad_strength(model, ids, attn, token_mask, cfg), ref)


@pytest.mark.parametrize("measure", ["frobenius", "l1"])
def test_every_method_matches_loop_other_measures_right_padding(model: torch.nn.Module, measure: str) -> None:
    ids, attn, token_mask = _batch("right")
    kw = dict(measure=measure, projections=("q", "k", "v", "o", "mlp"))
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
    for method in ("vmap", "onepass"):
        assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method=method)), ref)


@pytest.mark.parametrize("measure", ["nuclear", "frobenius", "l1"])
def test_onepass_v_alone_reads_every_token_at_once_in_row_groups_as_the_loop(model, measure, monkeypatch) -> None:
    """Without K, V's contexts come from one batched pass over groups of rows (``_v_contexts``), not the per-block
    loop; a small element budget cuts rows into pieces of a few tokens, a budget of 1 into one token a piece.
    Right padding, every family."""
    import corrpo.inversion.strength_kv as strength_kv

    ids, attn, token_mask = _batch("right")
    kw = dict(measure=measure, projections=("q", "v", "o"))
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
    for budget in (strength_kv.V_BATCH_ELEMENTS, 3 * 4 * 64, 1):
        monkeypatch.setattr(strength_kv, "V_BATCH_ELEMENTS", budget)
        assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="onepass")), ref)


def test_vmap_matches_loop_over_all_layers(model: torch.nn.Module) -> None:
    ids, attn, token_mask = _batch("left")
    kw = dict(layers="all", projections=("q", "k", "v", "o", "mlp"))
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
    assert_close(
        logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="vmap", chunk_size=7)), ref
    )


def test_z_is_the_logit_the_model_outputs(model: torch.nn.Module) -> None:
    """After Gemma's final soft-capping and Granite's logits_scaling: ``model(...).logits``, not lm_head's."""
    ids, attn, token_mask = _batch("left")
    batch = ScoringBatch.build(ids, attn, token_mask)
    parts = decoder_parts(model)
    with torch.no_grad():
        hidden, z = forward_hidden_and_z(parts, batch)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
        raw = parts.unembed(hidden)[batch.rows, batch.cols - 1, ids[batch.rows, batch.cols]]
    ref = logits[batch.rows, batch.cols - 1, ids[batch.rows, batch.cols]]
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.logits(hidden), logits, atol=1e-5, rtol=1e-5)
    if parts.layout.name in ("gemma2", "gemma3", "granite"):  # the map is really applied
        assert (raw - ref).abs().max() > 1e-2


# ------------------------------------------------------------------------------------ fused blocks
# Each fused module's blocks, written out here from the transformers source independently of families.py.
def _fused_blocks(family: str, config) -> tuple[str, int, dict[str, torch.Tensor]]:
    """(weight name, axis of the output features in the stored weight, block -> its output feature indices)."""
    if family == "gpt2":  # c_attn(x).split(n_embd, dim=2), Conv1D weight [in, out]
        e = config.n_embd
        return (
            "transformer.h.1.attn.c_attn.weight",
            1,
            {n: torch.arange(i * e, (i + 1) * e) for i, n in enumerate("qkv")},
        )
    if family == "phi3":  # qkv[..., :q_pos], qkv[..., q_pos : q_pos + kv*hd], the rest
        hd = config.hidden_size // config.num_attention_heads
        q_pos, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
        bounds = {"q": (0, q_pos), "k": (q_pos, q_pos + kv), "v": (q_pos + kv, q_pos + 2 * kv)}
        return "model.layers.1.self_attn.qkv_proj.weight", 0, {n: torch.arange(*b) for n, b in bounds.items()}
    # gpt_neox: qkv.view(..., heads, 3 * hd).chunk(3, dim=-1)
    heads, hd = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    rows = torch.arange(3 * heads * hd).view(heads, 3, hd)
    return (
        "gpt_neox.layers.1.attention.query_key_value.weight",
        0,
        {n: rows[:, i].flatten() for i, n in enumerate("qkv")},
    )


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gpt_neox"])
def test_fused_qkv_blocks_match_separately_parametrised_blocks(family: str) -> None:
    """Rebuild the fused weight from three separate leaf blocks; the brute-force gradient of the model's own
    output logit w.r.t. each block is that block's ``dz/dW`` -- compared with ``loop`` on the fused model."""
    model = tiny_family_model(family)
    ids, attn, token_mask = _batch("left")
    name, axis, blocks = _fused_blocks(family, model.config)
    fused = dict(model.named_parameters())[name].detach()
    leaves = {n: fused.index_select(axis, idx).clone().requires_grad_(True) for n, idx in blocks.items()}

    def assembled() -> torch.Tensor:
        weight = torch.zeros_like(fused)
        for n, idx in blocks.items():
            weight = weight.index_copy(axis, idx, leaves[n])
        return weight

    assert torch.equal(assembled(), fused)
    batch = ScoringBatch.build(ids, attn, token_mask)
    refs = {n: logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=(n,), method="loop"))
            for n in blocks}  # fmt: skip
    for b, j in list(zip(batch.rows.tolist(), batch.cols.tolist(), strict=True))[::4]:
        logits = functional_call(model, {name: assembled()}, (ids,), {"attention_mask": attn,
                                 "position_ids": position_ids_from_mask(attn)}).logits  # fmt: skip
        grads = torch.autograd.grad(logits[b, j - 1, ids[b, j]], list(leaves.values()))
        for n, g in zip(leaves, grads, strict=True):
            want = torch.linalg.matrix_norm(g.double(), ord="nuc").item()
            assert refs[n][b, j].item() == pytest.approx(want, rel=1e-4, abs=1e-7), (n, b, j)


def test_a_wrong_fused_layout_is_caught_by_onepass_against_loop(monkeypatch) -> None:
    """If GPT-NeoX's rows were read as contiguous thirds (they are interleaved per head), onepass k/v, which
    recompute the attention from the blocks, would disagree with the loop: the agreement tests the layout."""
    model = tiny_family_model("gpt_neox")
    ids, attn, token_mask = _batch("left")
    good = find_layout(model)
    thirds = {n: Slot(good.slots[n].path, lambda c, i=i: torch.arange(i * c.hidden_size, (i + 1) * c.hidden_size))
              for i, n in enumerate("qkv")}  # fmt: skip
    wrong: FamilyLayout = dataclasses.replace(good, slots={**good.slots, **thirds})
    monkeypatch.setattr(architectures, "find_layout", lambda m: wrong)
    for proj in ("k", "v"):
        ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=(proj,), method="loop"))
        got = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=(proj,), method="onepass"))
        assert max_relative_error(got, ref) > 1e-2


def test_sketch_on_a_fused_block_with_its_basis_directions_is_exact() -> None:
    """``sketch`` draws its directions on the block only (``_support``); with the block's basis it is exact."""
    model = tiny_family_model("gpt2")
    ids, attn, token_mask = _batch("left")
    batch = ScoringBatch.build(ids, attn, token_mask)
    (matrix,) = select_matrices(model, "last", ("k",))
    support = _support(matrix)
    assert support.sum() == matrix.weight.shape[0] * model.config.n_embd
    basis = torch.eye(matrix.weight.numel())[support.flatten()].view(-1, *matrix.weight.shape)
    ref = logit_grad_strength(
        model, ids, attn, token_mask, StrengthConfig("frobenius", projections=("k",), method="loop")
    )
    got = batch.scatter(sketch_squared_norms(model, batch, matrix.weight, basis, chunk_size=256).sqrt())
    assert_close(got, ref)


def test_mlp_means_the_matrices_the_family_has() -> None:
    names = [m.name for m in select_matrices(tiny_family_model("gpt2"), "last", ("mlp",))]
    assert names == ["layers.1.up", "layers.1.down"]
    names = [m.name for m in select_matrices(tiny_family_model("phi3"), "last", ("mlp",))]
    assert names == ["layers.1.gate", "layers.1.up", "layers.1.down"]


# ----------------------------------------------------------------------------------- unlisted models
def test_an_unlisted_family_with_separate_projections_gets_loop_and_vmap() -> None:
    """OPT is not listed: the generic layout finds ``model.decoder.layers[i].self_attn.{q,k,v,out}_proj``."""
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids, attn, token_mask = _batch("left")
    kw = dict(layers="all", projections=("q", "k", "v", "o", "mlp"))
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
    assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="vmap")), ref)
    # the loop itself against a backward of the model's own output logit
    b, j = 0, 8
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    params = [m.weight for m in select_matrices(model, "all", ("q", "k", "v", "o", "mlp"))]
    grads = torch.autograd.grad(logits[b, j - 1, ids[b, j]], params)
    want = torch.stack([torch.linalg.matrix_norm(g, ord="nuc") for g in grads]).mean().item()
    assert ref[b, j].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="OPTForCausalLM.*method='vmap'"):
        logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(method="onepass"))


def test_an_unlisted_family_without_separate_projections_is_an_error_naming_it() -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4))  # fmt: skip
    ids, attn, token_mask = _batch("left")
    with pytest.raises(ValueError, match="FalconForCausalLM is not a listed family"):
        logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(method="loop"))


# ---------------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gpt_neox"])
def test_bf16_onepass_stays_within_the_documented_bound_of_an_fp64_loop(family: str) -> None:
    """docs/inversion.md: on bf16 weights, onepass is within 10% per token (measured <= 4.2e-2) of an fp64 loop on
    the same weights, and its Spearman within the bound of the pairs those per-token errors order differently
    (``spearman_flip_bound``: bf16 rounds differently on different CPUs, so a fixed Spearman gap does not hold
    across them: 4.3e-3 on an Intel Xeon, 1.31e-2 on an AMD EPYC for qwen3); an fp32 upcast is exact (1e-4)."""
    from corrpo.inversion.correlation import batched_spearman
    from corrpo.inversion.strength import score_tokens

    bf16 = tiny_family_model(family).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (4, T), generator=gen)
    attn, token_mask = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
    proj = ("q", "k", "v", "o", "mlp")
    h_ref, s_ref = score_tokens(
        copy.deepcopy(bf16).double(), ids, attn, token_mask, StrengthConfig(projections=proj, method="loop")
    )
    scored = torch.isfinite(s_ref)
    rho_ref = batched_spearman(h_ref[scored], s_ref[scored]).item()
    h, s = score_tokens(bf16, ids, attn, token_mask, StrengthConfig(projections=proj, method="onepass"))
    err = max_relative_error(s, s_ref)
    assert 1e-4 < err < 0.1  # bf16 is really in play, and within the bound
    gap = abs(batched_spearman(h[scored], s[scored]).item() - rho_ref)
    bound = spearman_flip_bound(h[scored], s[scored], h_ref[scored], s_ref[scored])
    assert gap <= bound + 1e-9, f"Spearman gap {gap:.2e} > {bound:.2e}, the flipped pairs' bound"
    upcast = copy.deepcopy(bf16).float()
    assert_close(
        logit_grad_strength(upcast, ids, attn, token_mask, StrengthConfig(projections=proj, method="onepass")), s_ref
    )


@pytest.mark.parametrize(("family", "targets"), [("phi3", ["qkv_proj", "o_proj"]), ("gpt2", ["c_attn", "c_proj"])])
def test_lora_on_fused_projections_every_method_matches_loop(family: str, targets: list[str]) -> None:
    """The LoRA wrapper of a fused (or Conv1D) module: its blocks are those of the effective weight."""
    pytest.importorskip("peft")
    from corrpo.models.lora import LoRAConfig, apply_lora

    model = apply_lora(tiny_family_model(family), LoRAConfig(r=4, alpha=8, target_modules=targets), 0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B = 0 at init would make the adapters invisible
    ids, attn, token_mask = _batch("left")
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(method="loop"))
    for method in ("vmap", "onepass"):
        assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(method=method)), ref)
