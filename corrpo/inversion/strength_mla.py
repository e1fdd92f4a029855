"""The last layer's K and V strengths of multi-head latent attention (DeepSeek-V3) in closed form.

What K and V mean (:mod:`corrpo.models.families`): MLA projects each position's normed latent ``c_s`` (the input of
``kv_b_proj``) to per-head no-RoPE keys ``k_{s,h} = W_K[h] c_s`` and values ``v_{s,h} = W_V[h] c_s``, the K and V
row blocks of ``kv_b_proj``; a RoPE key part ``kr_s`` shared by the heads comes from ``kv_a_proj_with_mqa`` and is
not K. The scores are ``scale (qn_{t,h}.k_{s,h} + qr_{t,h}.R kr_s)`` with ``q = [qn | qr]`` q_b_proj's output
(RoPE on ``qr``). So the dense closed forms (:mod:`corrpo.inversion.strength_kv`) hold with ``c`` as both
projections' input, one key/value head per query head and no RoPE on the K part:

* V: ``dz_t/dW_V = sum_h g_{t,h} (sum_s P_{h,t,s} c_s)^T`` in head ``h``'s rows (``g`` = o_proj's input
  cotangent);
* K: ``dz_t/dW_K[h] = sum_s scale dS_{h,t,s} qn_{t,h} c_s^T`` with the softmax backward
  ``dS = P (g.v_s - g.ctx_t)``.

``P`` is recomputed from the captured q_b_proj, kv_a_proj_with_mqa and kv_b_proj outputs and RoPE cos/sin (either
of DeepSeek's layouts, ``config.rope_interleave``), causal with key padding and packed rows' segments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from corrpo.inversion.strength_common import LayerCapture, ScoringBatch
from corrpo.inversion.strength_config import StrengthConfig
from corrpo.inversion.strength_k import k_block_measures
from corrpo.inversion.strength_kv import (
    allowed_keys,
    attention_probs,
    block_key_start,
    rope,
    row_blocks,
    softmax_backward,
    v_measure,
)
from corrpo.models.architectures import DecoderParts


def _rope_mla(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool) -> Tensor:
    """DeepSeek's RoPE of ``x [..., rope]``: ``rotate_half`` form, or on interleaved pairs ``(x0, x1), ...``."""
    if not interleave:
        return rope(x, cos, sin)
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def mla_strengths(
    parts: DecoderParts,
    attn: nn.Module,
    cap: LayerCapture,
    ctx_grad: Tensor,
    batch: ScoringBatch,
    config: StrengthConfig,
    names: tuple[str, ...],
) -> dict[str, Tensor]:
    """Per-token k / v measures of MLA by the closed forms of the module docstring, in row blocks."""
    cfg = parts.config
    heads, nope, rope_dim, hv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    interleave = bool(getattr(cfg, "rope_interleave", False))
    bsz, seq = batch.input_ids.shape
    c = cap.input("k").detach().float().reshape(bsz, seq, -1)  # the normed latent (kv_b_proj's input, [B, 1, T, r])
    q = cap.output("q").detach().float().view(bsz, seq, heads, nope + rope_dim)
    kv = cap.full_output("k").detach().float().view(bsz, seq, heads, nope + hv)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    latent = cap.module_output(attn.kv_a_proj_with_mqa).detach().float()  # [B, T, r + rope]
    if cap.rope is None:
        raise ValueError(f"{parts.layout.name}: the last attention got no position_embeddings; use method='vmap'")
    cos, sin = (t.detach().float() for t in cap.rope)  # [B, T, rope]
    q_pass = q[..., :nope]
    q_rot = _rope_mla(q[..., nope:], cos[:, :, None], sin[:, :, None], interleave)  # [B, T, H, rope]
    k_rot = _rope_mla(latent[..., -rope_dim:], cos, sin, interleave)  # [B, T, rope], shared by the heads
    g_all = ctx_grad.float().view(bsz, seq, heads, hv)
    key_ok = batch.attention_mask.bool()
    arange = torch.arange(seq, device=c.device)
    out: dict[str, list[Tensor]] = {"k": [], "v": []}
    for b, pos in row_blocks(batch, config.chunk_size):
        S = int(pos.max()) + 1
        lo = block_key_start(batch, b, pos, S)
        raw = torch.einsum("nhe,she->nhs", q_pass[b, pos], k_nope[b, lo:S])
        raw = (raw + torch.einsum("nhe,se->nhs", q_rot[b, pos], k_rot[b, lo:S])) * attn.scaling
        probs = attention_probs(raw, allowed_keys(arange[lo:S], pos, key_ok[b, None, lo:S], None)[:, None, :], None)
        g = g_all[b, pos]  # [n, H, hv]
        if "v" in names:
            ctx_c = torch.einsum("nhs,sd->nhd", probs, c[b, lo:S])
            out["v"].append(v_measure(g[:, :, None], ctx_c[:, :, None], config.measure))
        if "k" in names:
            gv = torch.einsum("nhe,she->nhs", g, v[b, lo:S])
            d_scores = softmax_backward(probs, gv)
            no_rope = c.new_zeros(0, S - lo)  # the K rows carry no RoPE (the rotated key part is not K)
            out["k"].append(
                k_block_measures(
                    d_scores[:, :, None],
                    q_pass[b, pos][:, :, None],
                    attn.scaling,
                    no_rope,
                    no_rope,
                    c[b, lo:S],
                    pos - lo + 1,
                    config.measure,
                    config.k_solver,
                )  # fmt: skip
            )
    return {n: torch.cat(vals) for n, vals in out.items() if vals}
