"""Exact per-token gradient strengths of the LAST decoder layer from ONE backward.

Why one backward suffices. Let ``t = j - 1`` be the position whose logits score token ``j``. After the last
attention mixes positions, everything (o_proj, residual, RMSNorm, MLP, final norm, unembedding) acts on each
position alone, so any activation ``u_t`` of the last layer at or after the attention output influences
``z_t`` and no other ``z_s``. Hence the gradient of ``Z = sum_s z_s`` w.r.t. ``u_t`` equals ``dz_t/du_t``:
one backward of ``Z`` yields every per-token cotangent at once. The same holds for the query ``q_t``
(it only enters row ``t`` of the attention). With ``W`` a Linear with input ``a_t`` and output cotangent
``delta_t``:

* q_proj, o_proj, gate/up/down_proj: ``dz_t/dW = delta_t a_t^T`` -- rank 1, so nuclear = Frobenius
  = ``|delta_t| |a_t|`` and l1 = ``|delta_t|_1 |a_t|_1``.
* v_proj and k_proj mix positions: closed forms through the attention weights, in
  :mod:`corrpo.inversion.strength_kv`.

Family variants (``corrpo.models.families``), each exact:

* fused q/k/v (Phi-3 ``qkv_proj``, GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``) and fused gate/up (Phi-3):
  the hooks capture the fused module's input and output; a matrix's output is its block of output features,
  and its cotangent the same block of the fused output's cotangent. GPT-2's Conv1D stores ``W`` as
  ``[in, out]``: the gradient is ``a delta^T``, the transpose, with the same norms.
* q/k norms after the projection (Qwen3, Gemma 3: per head; OLMo 2: over the whole vector): Q's rank-1
  form is unchanged (``delta`` is the cotangent at q_proj's OUTPUT, before the norm). The queries and keys
  entering ``P`` are the normed ones, and K's gradient is pulled back through the k-norm: ``gk_raw =
  J_norm(k_s)^T gk_s``, computed exactly as a VJP of the layer's own norm module at the captured ``k_s``
  (a position-wise map: one batched VJP per token chunk).
* partial RoPE (GPT-NeoX ``rotary_pct``, Phi-3 ``partial_rotary_factor``): only the first ``cos.shape[-1]``
  dims of each head rotate; no RoPE (GPT-2, learned absolute positions): the rotation is the identity.
* attention-score soft-capping (Gemma 2: ``s = c tanh(r / c)`` of the scaled raw score ``r``): ``P`` is the
  softmax of the capped scores and the softmax backward is multiplied by ``ds/dr = 1 - tanh^2(r / c)``.
* scaling multipliers (Granite's ``attention_multiplier``, Gemma's ``query_pre_attn_scalar``): the
  attention module's own ``scaling``. Embedding/residual multipliers, post-norms, parallel residuals and the
  final soft-capping act position-wise after the attention and are inside the one backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from corrpo.inversion.strength_common import (
    LayerCapture,
    ScoringBatch,
    forward_hidden_and_z,
    rank1_measure,
    scoring_mode,
)
from corrpo.inversion.strength_config import StrengthConfig
from corrpo.inversion.strength_kv import kv_strengths
from corrpo.inversion.strength_mla import mla_strengths
from corrpo.inversion.strength_moe import expert_strengths
from corrpo.models.architectures import (
    DecoderParts,
    decoder_parts,
    expand_projections,
    resolve_layers,
)

_RANK1 = ("q", "o", "gate", "up", "down")


def _check_onepass(parts: DecoderParts, config: StrengthConfig) -> tuple[nn.Module, tuple[str, ...]]:
    n_layers = len(parts.layers)
    if resolve_layers(config.layers, n_layers) != [n_layers - 1]:
        raise ValueError(
            f"method='onepass' covers only the last layer; got layers={config.layers!r}. "
            "Use method='vmap' (exact, any layers) or 'loop'."
        )
    if parts.layout.onepass is not None:
        raise ValueError(
            f"method='onepass' is not available: {parts.layout.onepass}. Use method='vmap' (exact) or 'loop'."
        )
    layer = parts.layers[n_layers - 1]
    names = expand_projections(config.projections, parts.layout)
    attn = getattr(layer, parts.layout.attention)
    if any(n in ("k", "v") for n in names) and not getattr(attn, "is_causal", True):
        raise ValueError(
            "onepass k/v closed forms assume causal attention; the last layer is bidirectional. "
            "Use method='vmap' (exact) or 'loop' for k and v."
        )
    if any(n in ("k", "v") for n in names) and getattr(parts.config, "clip_qkv", None) is not None:
        raise ValueError(
            f"onepass k/v closed forms do not model config.clip_qkv={parts.config.clip_qkv} (OLMoE clamps q, k, v); "
            "use method='vmap' (exact) or 'loop' for k and v."
        )
    return layer, names


def onepass_strength(model: nn.Module, batch: ScoringBatch, config: StrengthConfig) -> tuple[Tensor, Tensor]:
    """All per-token strengths of the last layer from one forward + one backward. Returns (S [N], hidden)."""
    parts = decoder_parts(model)
    layer, names = _check_onepass(parts, config)
    cap = LayerCapture(parts, layer)
    blocks = [m for p in cap.proj.values() for m in (p, p.shared) if m is not None]
    weights = list({id(m.weight): m.weight for m in blocks}.values())
    try:
        with scoring_mode(model, weights):
            hidden, z = forward_hidden_and_z(parts, batch)
            if z.numel() == 0:
                return z.detach().float(), hidden.detach()
            values = _strengths(parts, layer, names, cap, z, batch, config, retain_graph=False)
    finally:
        cap.remove()
    return values, hidden.detach()


def onepass_on_forward(
    model: nn.Module, batch: ScoringBatch, config: StrengthConfig, forward: Callable[[], Tensor]
) -> Tensor:
    """``S [N]`` from the CALLER's forward: ``forward()`` must run ``model`` on ``batch`` (any mode, any logits
    slicing) and return the raw logits ``z [N]`` of ``batch``'s scored tokens, with their autograd graph.

    The same closed forms as :func:`onepass_strength` on the same captured activations; the graph is kept
    (``retain_graph``), so the caller can go on to backpropagate its own loss through the very same forward: the
    CorR-PO term then costs no forward of its own (``corrpo.training.grpo.corrpo_term_on_update_forward``). No ``.grad``
    is written (``torch.autograd.grad`` with respect to the captured activations only).
    """
    parts = decoder_parts(model)
    layer, names = _check_onepass(parts, config)
    cap = LayerCapture(parts, layer)
    try:
        z = forward()
    finally:
        cap.remove()
    if z.numel() == 0:
        return z.detach().float()
    with torch.enable_grad():
        return _strengths(parts, layer, names, cap, z, batch, config, retain_graph=True)


def _strengths(
    parts: DecoderParts,
    layer: nn.Module,
    names: tuple[str, ...],
    cap: LayerCapture,
    z: Tensor,
    batch: ScoringBatch,
    config: StrengthConfig,
    retain_graph: bool,
) -> Tensor:
    """The per-token measures from the captured last-layer activations and ONE backward of ``sum z``."""
    # cotangents needed: the rank-1 matrices' (fused, experts, shared expert) module outputs, and o's input (g, for
    # v and k)
    modules = [m for n in names if n in _RANK1 for m in (cap.proj[n].module, cap.proj[n].shared) if m is not None]
    want = {id(cap.module_output(m)): cap.module_output(m) for m in modules}
    ctx = cap.input("o")
    if "k" in names or "v" in names:
        want[id(ctx)] = ctx
    cotangents = torch.autograd.grad(z.sum(), list(want.values()), retain_graph=retain_graph)
    grads = dict(zip(want, cotangents, strict=True))
    rows, pos = batch.rows, batch.cols - 1
    per_matrix: list[Tensor] = []
    experts = expert_strengths(cap, names, grads, batch, config.measure)
    for name in names:
        if name in experts:
            per_matrix.append(experts[name])
        elif name in _RANK1:
            delta = cap.proj[name].output(grads[id(cap.full_output(name))])
            act = cap.input(name).detach()[rows, pos]
            per_matrix.append(rank1_measure(delta[rows, pos], act, config.measure))
    if "k" in names or "v" in names:
        closed_form = mla_strengths if parts.layout.mla else kv_strengths
        kv = closed_form(parts, getattr(layer, parts.layout.attention), cap, grads[id(ctx)], batch, config, names)
        per_matrix.extend(kv[n] for n in names if n in kv)
    return torch.stack(per_matrix).mean(0)
