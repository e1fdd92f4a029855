"""Mixture-of-experts and MLA families: what their Q, K, V, O and MLP strengths mean, checked against autograd on the
model's own output logit; what bites (sinks, windows, routing); what refuses and says why.

(Every method against the loop on every family, these included: tests/test_inversion_families.py.)"""

import pytest
import torch
from conftest import TINY_ARCH
from strength_checks import assert_close, padded_batch
from transformers import AutoModelForCausalLM

from corrpo.generation.decode_loop import unsupported_reason
from corrpo.inversion.strength import StrengthConfig, logit_grad_strength
from corrpo.inversion.strength_common import ScoringBatch, max_relative_error
from corrpo.models.architectures import select_matrices
from corrpo.models.forward import position_ids_from_mask
from corrpo.models.tiny_families import MOE_FAMILY_NAMES, random_family_model, tiny_config

VOCAB, T = 64, 12
pytestmark = pytest.mark.usefixtures("one_thread")


def _nuclear(g: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(g.double(), ord="nuc").item()


def _own_logit_grads(model, ids, attn, b: int, j: int, params: list) -> tuple:
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    return torch.autograd.grad(logits[b, j - 1, ids[b, j]], params)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_an_expert_matrix_is_the_block_diagonal_of_the_experts_the_token_was_routed_to(family):
    """The loop's MLP strength = the mean over gate, up, down of the nuclear norm of ``block_diag`` of every expert's
    ``dz/dW_e`` (and DeepSeek's shared expert); in the last layer exactly ``num_experts_per_tok`` experts are
    nonzero. Onepass agrees."""
    model = random_family_model(family, VOCAB, TINY_ARCH)
    ids, attn, token_mask = padded_batch(VOCAB, T, "left")
    batch = ScoringBatch.build(ids, attn, token_mask)
    matrices = select_matrices(model, "last", ("mlp",))
    assert [m.name.rsplit(".", 1)[1] for m in matrices] == ["gate", "up", "down"]
    assert all(m.experts and m.weight.dim() == 3 for m in matrices)
    assert all(len(m.also) == (family == "deepseek_v3") for m in matrices)
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=("mlp",), method="loop"))
    got = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=("mlp",), method="onepass"))
    assert_close(got, ref)
    for b, j in list(zip(batch.rows.tolist(), batch.cols.tolist(), strict=True))[::5]:
        values = []
        for matrix in matrices:
            blocks = [matrix, *matrix.also]
            grads = _own_logit_grads(model, ids, attn, b, j, [m.weight for m in blocks])
            experts = matrix.gradient(grads[0])  # [E, out, in]
            routed = (experts.flatten(1).abs().amax(1) > 0).sum().item()
            assert routed == model.config.num_experts_per_tok, (family, matrix.name, b, j)
            shared = [m.gradient(g) for m, g in zip(blocks[1:], grads[1:], strict=True)]
            values.append(_nuclear(torch.block_diag(*experts, *shared)))
        assert ref[b, j].item() == pytest.approx(sum(values) / 3, rel=1e-5), (family, b, j)


def test_mla_q_k_v_o_are_q_b_proj_the_k_and_v_rows_of_kv_b_proj_and_o_proj():
    """docs/inversion.md: DeepSeek-V3's K is kv_b_proj's k_nope rows of every head, V its v rows, written out here
    from the modeling file's ``view(..., heads, nope + v).split`` independently of families.py."""
    model = random_family_model("deepseek_v3", VOCAB, TINY_ARCH)
    cfg, attn = model.config, model.model.layers[-1].self_attn
    ids, attn_mask, token_mask = padded_batch(VOCAB, T, "right")
    rows = torch.arange(cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    rows = rows.view(cfg.num_attention_heads, -1)
    blocks = {"k": rows[:, : cfg.qk_nope_head_dim].flatten(), "v": rows[:, cfg.qk_nope_head_dim :].flatten()}
    refs = {n: logit_grad_strength(model, ids, attn_mask, token_mask, StrengthConfig(projections=(n,), method="loop"))
            for n in ("q", "k", "v", "o")}  # fmt: skip
    b, j = 1, 6
    params = [attn.q_b_proj.weight, attn.kv_b_proj.weight, attn.o_proj.weight]
    g_q, g_kv, g_o = _own_logit_grads(model, ids, attn_mask, b, j, params)
    want = {"q": _nuclear(g_q), "k": _nuclear(g_kv[blocks["k"]]), "v": _nuclear(g_kv[blocks["v"]]), "o": _nuclear(g_o)}
    for n, value in want.items():
        assert refs[n][b, j].item() == pytest.approx(value, rel=1e-5), n


@pytest.mark.parametrize("overrides", [dict(rope_interleave=False), dict(q_lora_rank=None)])
def test_mla_closed_forms_hold_for_both_rope_layouts_and_without_q_lora(overrides):
    torch.manual_seed(0)
    config = tiny_config("deepseek_v3", VOCAB, TINY_ARCH, 0, 1, 2, initializer_range=0.2, **overrides)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, attn, token_mask = padded_batch(VOCAB, T, "right")
    kw = dict(projections=("q", "k", "v", "o", "mlp"))
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
    assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="onepass")), ref)


def test_gpt_oss_sinks_and_sliding_window_bite_and_the_closed_forms_follow_them():
    """The last layer is a sliding one (window 5 < 12 tokens) with nonzero sinks: zeroing the sinks to -inf (no sink)
    or widening the window changes the loop's K/V strengths, and onepass follows each."""
    model = random_family_model("gpt_oss", VOCAB, TINY_ARCH)
    attn = model.model.layers[-1].self_attn
    assert attn.sliding_window == 5 and attn.sinks.abs().min() > 0
    ids, attn_mask, token_mask = padded_batch(VOCAB, T, "left")
    cfg = dict(projections=("k", "v"))

    def both() -> torch.Tensor:
        ref = logit_grad_strength(model, ids, attn_mask, token_mask, StrengthConfig(**cfg, method="loop"))
        assert_close(
            logit_grad_strength(model, ids, attn_mask, token_mask, StrengthConfig(**cfg, method="onepass")), ref
        )
        return ref

    base = both()
    with torch.no_grad():
        sinks = attn.sinks.clone()
        attn.sinks.fill_(-1e4)
    no_sink = both()
    with torch.no_grad():
        attn.sinks.copy_(sinks)
    attn.sliding_window = None
    model.config.layer_types = ["full_attention", "full_attention"]
    full = both()
    assert max_relative_error(no_sink, base) > 1e-2 and max_relative_error(full, base) > 1e-2


def test_onepass_refuses_olmoe_clip_qkv_for_k_and_v_and_vmap_stays_exact():
    torch.manual_seed(0)
    config = tiny_config("olmoe", VOCAB, TINY_ARCH, 0, 1, 2, initializer_range=0.2, clip_qkv=0.5)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids, attn, token_mask = padded_batch(VOCAB, T, "left")
    with pytest.raises(ValueError, match="clip_qkv=0.5.*method='vmap'"):
        logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(projections=("k",), method="onepass"))
    kw = dict(projections=("q", "k", "v", "o", "mlp"))
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="loop"))
    assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**kw, method="vmap")), ref)
    qo = dict(projections=("q", "o", "mlp"))  # the rank-1 forms read autograd's own cotangents: clamps included
    ref = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**qo, method="loop"))
    assert_close(logit_grad_strength(model, ids, attn, token_mask, StrengthConfig(**qo, method="onepass")), ref)


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_the_decode_loop_falls_back_for_moe_and_mla_saying_why(family):
    model = random_family_model(family, VOCAB, TINY_ARCH)
    model.config._attn_implementation = "sdpa"
    reason = unsupported_reason(model, 32)
    assert reason is not None and family in reason
    assert ("mixture-of-experts" in reason) and (family != "deepseek_v3" or "latent attention" in reason)
    assert family != "gpt_oss" or "sinks" in reason


def test_sketch_runs_through_the_experts_and_with_the_basis_of_an_expert_block_is_exact():
    """Forward-mode AD has no grouped_mm rule: the JVPs run the experts' eager loop (``_eager_experts``); with the
    basis of the gate rows of every expert the sketch is the block diagonal's squared Frobenius norm exactly."""
    from corrpo.inversion.strength_sketch import _support, sketch_squared_norms

    model = random_family_model("qwen3_moe", VOCAB, TINY_ARCH)
    ids, attn, token_mask = padded_batch(VOCAB, T, "left")
    batch = ScoringBatch.build(ids, attn, token_mask)
    (gate,) = [m for m in select_matrices(model, "last", ("mlp",)) if m.name.endswith("gate")]
    support = _support(gate)
    basis = torch.eye(gate.weight.numel())[support.flatten()].view(-1, *gate.weight.shape)
    got = sketch_squared_norms(model, batch, gate.weight, basis, chunk_size=512)
    assert model.config._experts_implementation != "eager"  # restored
    for n, (b, j) in list(enumerate(zip(batch.rows.tolist(), batch.cols.tolist(), strict=True)))[::4]:
        (grad,) = _own_logit_grads(model, ids, attn, b, j, [gate.weight])
        assert got[n].item() == pytest.approx(gate.gradient(grad).square().sum().item(), rel=1e-4, abs=1e-9)
    est = logit_grad_strength(model, ids, attn, token_mask, StrengthConfig("frobenius", method="sketch", sketch_dim=8))
    assert torch.equal(torch.isfinite(est), batch.mask)
