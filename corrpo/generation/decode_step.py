"""The lean decode step: one token of a Llama-style decoder as a few large torch ops on the HF module's own weights.

Why: on a CPU at the embedded default's shapes (batch 128, hidden 128) one HF decode step costs ~6 ms against a
~1 ms matmul floor -- it is bound by the NUMBER of small ops per token (module calls, the dynamic cache's
concatenation, the mask rebuilt every step, rotary recomputed per layer), not by FLOPs. A static cache,
``torch.compile`` and a plain loop over the HF model's forward did not help. So :func:`prefill` and
:class:`DecodeStep` compute the step directly:

* **prefill once per prompt**: the ``B`` prompts go through the HF model's own forward once (not ``B * G``
  times); its keys/values are copied ``G`` times into a preallocated ``[N, (P + L) * H_kv, d_head]`` cache per
  layer (key ``p * H_kv + h``: head ``h`` at position ``p``), written in place at each step (no concatenation);
* **fused projections**: one matmul for ``[W_q; W_k; W_v]`` and one for ``[W_gate; W_up]`` per layer (the
  output rows are the same dot products, so the values are the same; the tests check bit-identity);
* **rotary once**: ``cos``/``sin`` for every decode position from the model's own rotary module, once per
  call; q and k are rotated together as ``x * cos + swap_halves(x) * sin_signed`` where ``sin_signed`` is
  ``[-sin_1 | sin_2]`` -- elementwise the same products and sums as HF's ``rotate_half``;
* **the mask built once**: decoding one token attends to every real prompt token and every generated one, so
  the additive bias is the prompt's padding mask followed by zeros, built once and sliced per step; every head
  of a row goes into one batched matrix product, the other key/value heads' keys masked (:func:`cached_attention`);
* ``F.rms_norm`` (one op; the same values as the HF norm module in fp32, the only dtype the loop takes);
* **rows dropped in place**: :meth:`DecodeStep.keep_rows` keeps only some rows' caches, bias and rotary rows, so
  a row the loop has finished costs nothing afterwards.

Which families: the step reads the projections, the attention and MLP modules, the decoder, its final norm and
the unembedding THROUGH the family layout (:mod:`corrpo.models.families`, :func:`decoder_parts`), so the families
it runs are the layouts that give it what it reads (:func:`layout_gap`, :data:`STEP_FAMILIES`): separate
``[out, in]`` Linears for q, k, v, o, gate, up, down, rotary positions, per-head q/k norms or none, and lm_head's
logits as the output. What a layout does not say -- a plain embedding lookup and the pre-norm pair of ``w * x /
rms(x)`` RMSNorms -- is checked on the model itself (:func:`family_gap`; Gemma's scaled embedding stops there).
Adding a Llama-style family is then adding its layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from corrpo.models.architectures import DecoderParts, decoder_parts, projection
from corrpo.models.families import ATTENTION_PROJECTIONS, LAYOUTS, MLP_PROJECTIONS, FamilyLayout, head_counts
from corrpo.models.forward import position_ids_from_mask

STEP_MATRICES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
"""The matrices the step reads, each a plain ``nn.Linear`` of its own: q/k/v and gate/up are fused here."""
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
"""A pre-norm layer's two norms (before attention, before the MLP): modules the layout does not name."""
HEAD_NORMS = ("q_norm", "k_norm")
"""The attention's per-head norms of a ``qk_norm="head"`` family."""
# A layout that leaves ``logit_map`` at its default outputs lm_head's logits as they are; the others override it.
_IDENTITY_LOGIT_MAP = next(f.default for f in fields(FamilyLayout) if f.name == "logit_map")


def module_at(root: nn.Module, path: tuple[str, ...]) -> nn.Module:
    """The submodule at ``path`` (a layout slot's path, or its parent's) under ``root``."""
    for name in path:
        root = getattr(root, name)
    return root


def layout_gap(layout: FamilyLayout) -> str | None:
    """What the step needs that the family's layout does not give it (``None``: nothing)."""
    if layout.beyond_dense is not None:  # MoE, MLA, sinks: the step runs one dense attention and gated MLP
        return f"it has {layout.beyond_dense} (the step runs dense attention and one gated MLP)"
    if layout.conv1d:
        return "its weights are stored [in, out] (Conv1D)"
    if not layout.rope:
        return "it has no rotary position embedding"
    for name in STEP_MATRICES:
        slot = layout.slots.get(name)
        if slot is None:
            return f"it has no {name!r} matrix (the step runs a gated MLP)"
        if slot.features is not None:
            return f"its {name!r} matrix is a block of the fused {'.'.join(slot.path)}"
    if layout.qk_norm not in (None, "head"):
        return f"its q/k norm is {layout.qk_norm!r} (the step norms each head of q and k, or neither)"
    if layout.logit_map is not _IDENTITY_LOGIT_MAP:
        return "it maps its logits after lm_head (soft-capping or scaling); the step returns lm_head's"
    if layout.final_norm is None:
        return "it has no final norm"
    return None


STEP_FAMILIES = tuple(layout.name for layout in LAYOUTS if layout_gap(layout) is None)
"""The layouts that give the step all it reads; a model of one still needs the modules :func:`family_gap` checks."""


def listed_layout(model: nn.Module) -> FamilyLayout | None:
    """The listed family's layout of ``model`` (matched by class, as :func:`find_layout`), ``None`` if unlisted."""
    names = {cls.__name__ for cls in type(model).__mro__}
    return next((layout for layout in LAYOUTS if names.intersection(layout.classes)), None)


def family_gap(model: PreTrainedModel, layout: FamilyLayout) -> str | None:
    """What the step needs of ``model``'s own modules that its layout does not say (``None``: nothing): a plain
    embedding lookup, a rotary module, the pre-norm pair of RMSNorms (q/k head norms too) and the MLP's activation.

    Missing layers are left to the caller's structure check, which names what it looked for."""
    embed = model.get_input_embeddings()
    if type(embed).forward is not nn.Embedding.forward:
        return f"its input embedding {type(embed).__name__} is not a plain lookup (the step reads its weight)"
    base = getattr(model, layout.base, None)
    layers = getattr(base, layout.layers, None)
    if layers is None:
        return None
    if not isinstance(getattr(base, "rotary_emb", None), nn.Module):
        return "its decoder has no rotary_emb module (the step takes cos and sin from it)"
    norms = [(f"the final {layout.final_norm}", getattr(base, layout.final_norm, None))]
    for i, layer in enumerate(layers):
        extra = sorted(n for n, _ in layer.named_children() if "norm" in n and n not in LAYER_NORMS)
        if extra:
            return f"layer {i} has norms a pre-norm layer does not apply: {extra}"
        if not isinstance(getattr(module_at(layer, layout.slots["gate"].path[:-1]), "act_fn", None), nn.Module):
            return f"layer {i}'s MLP has no act_fn module"
        norms += [(f"layer {i}'s {n}", getattr(layer, n, None)) for n in LAYER_NORMS]
        attn = getattr(layer, layout.attention)
        if layout.qk_norm == "head":
            norms += [(f"layer {i}'s {n}", getattr(attn, n, None)) for n in HEAD_NORMS]
        elif any(hasattr(attn, n) for n in HEAD_NORMS):
            return f"layer {i}'s attention has q/k norms its layout does not declare (qk_norm=None)"
    for where, norm in norms:
        if not hasattr(norm, "variance_epsilon"):
            found = "missing" if norm is None else f"a {type(norm).__name__}"
            return f"{where} is {found}, not the RMSNorm w * x / rms(x) with variance_epsilon the step computes"
    return None


@dataclass
class StepLayer:
    """One decoder layer's weights for the decode step (fused where the rows are independent)."""

    norm1: nn.Module
    qkv_weight: Tensor
    qkv_bias: Tensor | None
    qk_norm_eps: float
    qk_norm_weight: Tensor | None
    """``qk_norm="head"``: ``[H_q + H_kv, d_head]`` the q_norm weight on each query head, then k_norm's on each key
    head."""
    o_proj: nn.Linear
    norm2: nn.Module
    gate_up_weight: Tensor
    gate_up_bias: Tensor | None
    down_proj: nn.Linear
    act: nn.Module


def step_layers(parts: DecoderParts) -> list[StepLayer]:
    """Every layer's :class:`StepLayer`, its projections read through the family layout."""
    layout = parts.layout
    heads_q, heads_kv, _ = head_counts(parts.config)
    out = []
    for layer in parts.layers:
        q, k, v, o, gate, up, down = (projection(parts, layer, name).module for name in STEP_MATRICES)
        norm1, norm2 = (getattr(layer, name) for name in LAYER_NORMS)
        qk_norm, qk_eps = None, 0.0
        if layout.qk_norm == "head":
            attn = getattr(layer, layout.attention)
            qk_norm = torch.cat([attn.q_norm.weight.expand(heads_q, -1), attn.k_norm.weight.expand(heads_kv, -1)])
            qk_eps = attn.q_norm.variance_epsilon
        out.append(
            StepLayer(
                norm1=norm1,
                qkv_weight=torch.cat([q.weight, k.weight, v.weight]),
                qkv_bias=_cat_bias(q, k, v),
                qk_norm_eps=qk_eps,
                qk_norm_weight=qk_norm,
                o_proj=o,
                norm2=norm2,
                gate_up_weight=torch.cat([gate.weight, up.weight]),
                gate_up_bias=_cat_bias(gate, up),
                down_proj=down,
                act=module_at(layer, layout.slots["gate"].path[:-1]).act_fn,
            )
        )
    return out


def prefill(
    model: PreTrainedModel, prompt_ids: Tensor, prompt_mask: Tensor, num_generations: int, max_new_tokens: int
) -> tuple[DecodeStep, Tensor]:
    """The HF model's own forward on the ``B`` prompts, positions as ``generate`` makes them: the
    :class:`DecodeStep` holding its keys/values (each prompt's copied to its ``G`` rows) and the first token's
    ``[B * G, V]`` fp32 logits."""
    B, P = prompt_ids.shape
    G, L = num_generations, max_new_tokens
    _, heads_kv, d_head = head_counts(model.config)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    dtype = out.cache.layers[0].keys.dtype
    # one cache per row and layer, [N, (P + L) * H_kv, d] (key p * H_kv + h: head h at position p); its first
    # P * H_kv keys are the prompt's, copied to each of the G samples of a prompt
    width = (P + L) * heads_kv
    caches = []
    for c in out.cache.layers:
        kv = torch.empty(2, B * G, width, d_head, dtype=dtype, device=prompt_ids.device)
        kv[0, :, : P * heads_kv] = c.keys.transpose(1, 2).reshape(B, P * heads_kv, d_head).repeat_interleave(G, 0)
        kv[1, :, : P * heads_kv] = c.values.transpose(1, 2).reshape(B, P * heads_kv, d_head).repeat_interleave(G, 0)
        caches.append(kv)
    logits = out.logits[:, -1, :].float().repeat_interleave(G, dim=0)
    del out  # the prefill's own cache: freed before the step's tensors are built
    return DecodeStep(model, caches, prompt_mask, G, L), logits


class DecodeStep:
    """One ``generate`` call's decode step after :func:`prefill`: ``next_logits(tokens, t)`` feeds each computed
    row's ``t``-th generated token and returns the next ``[n, V]`` fp32 logits; ``keep_rows(keep, t)`` first
    drops every other row (its cache, bias and rotary rows). Everything a step needs is built here, once."""

    def __init__(
        self, model: PreTrainedModel, caches: list[Tensor], prompt_mask: Tensor, num_generations: int, steps: int
    ) -> None:
        parts = decoder_parts(model)
        B, P = prompt_mask.shape
        G, L = num_generations, steps
        heads_q, heads_kv, d_head = head_counts(parts.config)
        device, dtype = prompt_mask.device, caches[0].dtype
        self.caches, self.layers = caches, step_layers(parts)
        self.embed = model.get_input_embeddings().weight
        self.final_norm, self.unembed = getattr(parts.base, parts.layout.final_norm), parts.unembed
        self.prompt_width, self.heads_q, self.heads_kv, self.d_head = P, heads_q, heads_kv, d_head
        kv_head_of_query = torch.arange(heads_q, device=device) // (heads_q // heads_kv)
        same_head = kv_head_of_query[:, None] == torch.arange(heads_kv, device=device)  # [H_q, H_kv]
        real = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(B, L, dtype=torch.bool)], 1)  # [B, P + L]
        allowed = real[:, None, :, None] & same_head[None, :, None, :]  # [B, H_q, P + L, H_kv]
        self.bias = _additive(allowed.flatten(2).repeat_interleave(G, 0), dtype)  # [N, H_q, (P + L) * H_kv]
        positions = prompt_mask.sum(-1, keepdim=True).repeat_interleave(G, 0) + torch.arange(L, device=device)
        cos, sin = parts.base.rotary_emb(self.embed[:1], positions)  # [N, L, d_head], positions n_real + t
        half = d_head // 2
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        self.cos = cos.transpose(0, 1).unsqueeze(2).contiguous()  # [L, N, 1, d_head]
        self.sin_signed = sin_signed.transpose(0, 1).unsqueeze(2).contiguous()

    def keep_rows(self, keep: Tensor, t: int) -> None:
        """Keep only the computed rows ``keep`` before step ``t`` (their keys so far copied, the rest dropped)."""
        filled = (self.prompt_width + t) * self.heads_kv
        self.caches = [_compacted(kv, keep, filled) for kv in self.caches]
        self.bias, self.cos, self.sin_signed = self.bias[keep], self.cos[:, keep], self.sin_signed[:, keep]

    def next_logits(self, tokens: Tensor, t: int) -> Tensor:
        """``[n, V]`` fp32 logits after ``tokens`` (``[n]``: each computed row's ``t``-th generated token)."""
        heads_q, heads_kv, d_head = self.heads_q, self.heads_kv, self.d_head
        heads_qk, half, scale = heads_q + heads_kv, d_head // 2, d_head**-0.5
        filled = (self.prompt_width + t) * heads_kv  # keys before this step's
        n, seen = len(tokens), filled + heads_kv  # keys so far, this step's included
        cos, sin_signed, bias = self.cos[t], self.sin_signed[t], self.bias[:, :, :seen]
        h = F.embedding(tokens, self.embed)
        for layer, kv in zip(self.layers, self.caches, strict=True):
            x = _rms_norm(layer.norm1, h)
            qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias).view(n, heads_qk + heads_kv, d_head)
            qk = qkv[:, :heads_qk]
            if layer.qk_norm_weight is not None:
                qk = _head_norm(layer, qk)
            swapped = torch.cat([qk[..., half:], qk[..., :half]], dim=-1)
            qk = qk * cos + swapped * sin_signed
            kv[0, :, filled:seen] = qk[:, heads_q:]
            kv[1, :, filled:seen] = qkv[:, heads_qk:]
            a = cached_attention(qk[:, :heads_q], kv[0, :, :seen], kv[1, :, :seen], bias, scale)
            h = h + F.linear(a.reshape(n, heads_q * d_head), layer.o_proj.weight, layer.o_proj.bias)
            x = _rms_norm(layer.norm2, h)
            gate_up = F.linear(x, layer.gate_up_weight, layer.gate_up_bias)
            inner = gate_up.shape[-1] // 2
            x = layer.act(gate_up[:, :inner]) * gate_up[:, inner:]
            h = h + F.linear(x, layer.down_proj.weight, layer.down_proj.bias)
        return F.linear(_rms_norm(self.final_norm, h), self.unembed.weight, self.unembed.bias).float()


def cached_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float) -> Tensor:
    """One decoded token's attention ``softmax(scale * q . k + bias) @ v`` over its row's cache, all heads at once.

    ``q``: ``[n, H_q, d]``; ``keys``/``values``: ``[n, S * H_kv, d]``, key ``s * H_kv + h`` is head ``h`` at
    position ``s``; ``bias``: ``[n, H_q, S * H_kv]``, 0 where query head ``h_q``'s key/value head is ``h`` and
    position ``s`` is a real token, else ``-inf``. Returns ``[n, H_q, d]``.

    Why this shape: a decode step is dispatch-bound, and batched matmuls cost about a microsecond per batch
    entry, so every head of a row goes into one matrix product (``n`` entries, not ``n * H_kv``); the keys of
    the other heads are masked by the bias (their weight is exactly 0).
    """
    scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), values)


def _cat_bias(*linears: nn.Linear) -> Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


def _compacted(kv: Tensor, keep: Tensor, filled: int) -> Tensor:
    """A ``[2, n, width, d]`` cache with only the rows ``keep``, their first ``filled`` keys copied."""
    out = kv.new_empty(2, len(keep), *kv.shape[2:])
    torch.index_select(kv[:, :, :filled], 1, keep, out=out[:, :, :filled])
    return out


def _additive(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A boolean mask as an additive attention bias: 0 where allowed, ``-inf`` elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, -float("inf"))


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """The HF RMSNorm module's output ``w * x / sqrt(mean(x^2) + eps)`` as one op (fp32: the same values)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _head_norm(layer: StepLayer, qk: Tensor) -> Tensor:
    """Per-head q/k norms (q_norm on each query head, k_norm on each key head) as one normalisation and one
    product."""
    return F.rms_norm(qk, qk.shape[-1:], None, layer.qk_norm_eps) * layer.qk_norm_weight
