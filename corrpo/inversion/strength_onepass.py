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
* v_proj (mixes positions): ``ctx_{t,h} = sum_s P_{h,t,s} (W_v x_s + b)_{kv(h)}`` so
  ``dz_t/dW_v[kv] = sum_{h in kv} g_{t,h} c_{t,h}^T`` with ``g_{t,h} = dz_t/dctx_{t,h}`` (exact from the
  one backward) and ``c_{t,h} = sum_s P_{h,t,s} x_s`` (``x`` = the normed layer input). Rank <= #heads.
* k_proj (mixes positions, RoPE): with ``dS_{h,t,s} = P_{h,t,s} (g_{t,h}.v_s - g_{t,h}.ctx_{t,h})`` the
  softmax backward, the gradient w.r.t. the rotated key is ``kt_{t,s} = scale sum_{h in kv} dS_{h,t,s}
  q~_{t,h}``; undoing RoPE (its transpose: ``y cos - rotate_half(y sin)``) gives ``gk_{t,s}`` and
  ``dz_t/dW_k = sum_s gk_{t,s} x_s^T``. Cost O(T^2 d) per token block; built in chunks.

``P`` is recomputed from the captured q, k and RoPE cos/sin with the causal + key-padding mask, so the
result does not depend on the attention backend (eager/SDPA). GQA is handled by grouping query heads by
their kv head. Biases are not scored (weights only); q/k/v biases enter only through the captured outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from corrpo.inversion.architectures import (
    decoder_parts,
    expand_projections,
    projection,
    resolve_layers,
)
from corrpo.inversion.strength_common import (
    ScoringBatch,
    forward_hidden_and_z,
    matrix_measure,
    rank1_measure,
    scoring_mode,
)
from corrpo.inversion.strength_config import StrengthConfig

_ALL_LAST_LAYER = ("q", "k", "v", "o", "gate", "up", "down")


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Capture:
    """Forward hooks that keep the inputs/outputs of the last layer's Linears and the RoPE cos/sin."""

    def __init__(self, layer: nn.Module) -> None:
        self.io: dict[str, tuple[Tensor, Tensor]] = {}
        self.rope: tuple[Tensor, Tensor] | None = None
        self._handles = []
        for name in _ALL_LAST_LAYER:
            self._handles.append(projection(layer, name).register_forward_hook(self._linear_hook(name)))
        self._handles.append(layer.self_attn.register_forward_pre_hook(self._attn_hook, with_kwargs=True))

    def _linear_hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self.io[name] = (inputs[0], output)

        return hook

    def _attn_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.rope = kwargs.get("position_embeddings")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _check_onepass(model: nn.Module, config: StrengthConfig) -> tuple[nn.Module, tuple[str, ...]]:
    parts = decoder_parts(model)
    n_layers = len(parts.layers)
    if resolve_layers(config.layers, n_layers) != [n_layers - 1]:
        raise ValueError(
            f"method='onepass' covers only the last layer; got layers={config.layers!r}. "
            "Use method='vmap' (exact, any layers) or 'loop'."
        )
    layer = parts.layers[n_layers - 1]
    names = expand_projections(config.projections)
    if any(n in ("k", "v") for n in names) and getattr(layer.self_attn, "sliding_window", None):
        raise ValueError("onepass k/v closed forms assume full causal attention; last layer uses a sliding window")
    return layer, names


def onepass_strength(model: nn.Module, batch: ScoringBatch, config: StrengthConfig) -> tuple[Tensor, Tensor]:
    """All per-token strengths of the last layer from one forward + one backward. Returns (S [N], hidden)."""
    layer, names = _check_onepass(model, config)
    parts = decoder_parts(model)
    weights = [projection(layer, n).weight for n in _ALL_LAST_LAYER]
    cap = _Capture(layer)
    try:
        with scoring_mode(model, weights):
            hidden, z = forward_hidden_and_z(parts, batch)
            if z.numel() == 0:
                return z.detach().float(), hidden.detach()
            # cotangents needed: q/gate/up/down/o outputs (rank-1 terms) and o_proj's input (g, for v and k)
            want = {n: cap.io[n][1] for n in names if n in ("q", "o", "gate", "up", "down")}
            if "k" in names or "v" in names:
                want["ctx"] = cap.io["o"][0]
            grads = dict(zip(want, torch.autograd.grad(z.sum(), list(want.values())), strict=True))
    finally:
        cap.remove()
    rows, pos = batch.rows, batch.cols - 1
    per_matrix: list[Tensor] = []
    for name in names:
        if name in ("q", "o", "gate", "up", "down"):
            act = cap.io[name][0].detach()[rows, pos]
            per_matrix.append(rank1_measure(grads[name][rows, pos], act, config.measure))
    if "k" in names or "v" in names:
        kv = _kv_strengths(layer.self_attn, cap, grads["ctx"], batch, config, names)
        per_matrix.extend(kv[n] for n in names if n in kv)
    return torch.stack(per_matrix).mean(0), hidden.detach()


def _kv_strengths(
    attn: nn.Module,
    cap: _Capture,
    ctx_grad: Tensor,
    batch: ScoringBatch,
    config: StrengthConfig,
    names: tuple[str, ...],
) -> dict[str, Tensor]:
    """Per-token v_proj / k_proj measures by the closed forms of the module docstring, token-chunked."""
    n_heads = attn.config.num_attention_heads
    n_kv = attn.config.num_key_value_heads
    hd, rep, scale = attn.head_dim, n_heads // n_kv, attn.scaling
    x = cap.io["q"][0].detach().float()  # [B, T, d] normed layer input (shared by q, k, v)
    bsz, seq, _ = x.shape
    cos, sin = (t.detach().float() for t in cap.rope)  # [B, T, hd]
    q = cap.io["q"][1].detach().float().view(bsz, seq, n_kv, rep, hd)
    k = cap.io["k"][1].detach().float().view(bsz, seq, n_kv, hd)
    v = cap.io["v"][1].detach().float().view(bsz, seq, n_kv, hd)
    k_rot = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
    g_all = ctx_grad.float().view(bsz, seq, n_kv, rep, hd)
    key_ok = batch.attention_mask.bool()
    arange = torch.arange(seq, device=x.device)
    out: dict[str, list[Tensor]] = {"k": [], "v": []}
    for start in range(0, batch.num_scored, config.chunk_size):
        rows = batch.rows[start : start + config.chunk_size]
        pos = batch.cols[start : start + config.chunk_size] - 1
        c_cos, c_sin = cos[rows, pos][:, None, None], sin[rows, pos][:, None, None]
        q_rot = q[rows, pos] * c_cos + _rotate_half(q[rows, pos]) * c_sin  # [n, kv, rep, hd]
        scores = torch.einsum("nkre,nske->nkrs", q_rot, k_rot[rows]) * scale
        allowed = (arange[None, :] <= pos[:, None]) & key_ok[rows]  # [n, T]
        probs = scores.masked_fill(~allowed[:, None, None, :], float("-inf")).softmax(-1)
        g = g_all[rows, pos]  # [n, kv, rep, hd]
        xr = x[rows]  # [n, T, d]
        if "v" in names:
            c = torch.einsum("nkrs,nsd->nkrd", probs, xr)
            out["v"].append(_v_measure(g, c, config.measure))
        if "k" in names:
            gv = torch.einsum("nkre,nske->nkrs", g, v[rows])
            d_scores = probs * (gv - (probs * gv).sum(-1, keepdim=True))
            gk_rot = torch.einsum("nkrs,nkre->nske", d_scores, q_rot) * scale  # [n, T, kv, hd]
            r_cos, r_sin = cos[rows][:, :, None], sin[rows][:, :, None]
            gk = gk_rot * r_cos - _rotate_half(gk_rot * r_sin)
            mat = torch.einsum("nske,nsd->nked", gk, xr).flatten(1, 2)
            out["k"].append(matrix_measure(mat, config.measure))
    return {n: torch.cat(vals) for n, vals in out.items() if vals}


def _v_measure(g: Tensor, c: Tensor, measure: str) -> Tensor:
    """Measure of ``M_n = sum_h g_{n,h} c_{n,h}^T`` (rows of head h in its kv block) = ``U_n V_n^T``.

    ``U`` ``[n, kv*hd, H]`` holds ``g_h`` in the rows of kv head ``kv(h)``, ``V`` ``[n, d, H]`` holds ``c_h``.
    For nuclear / Frobenius the singular values of ``U V^T`` are those of the ``H x H`` core ``R_u R_v^T``
    (``U = Q_u R_u``, ``V = Q_v R_v``, orthonormal ``Q`` leave singular values unchanged): H x H SVDs
    instead of ``kv*hd x d`` ones. The l1 norm is not unitarily invariant, so it builds ``M``.
    """
    n, n_kv, rep, hd = g.shape
    heads = n_kv * rep
    if measure == "l1" or heads > min(n_kv * hd, c.shape[-1]):
        return matrix_measure(torch.einsum("nkre,nkrd->nked", g, c).flatten(1, 2), measure)
    u = g.new_zeros(n, n_kv, hd, n_kv, rep)
    idx = torch.arange(n_kv, device=g.device)
    u[:, idx, :, idx, :] = g.permute(1, 0, 3, 2)
    r_u = torch.linalg.qr(u.reshape(n, n_kv * hd, heads), mode="r").R
    r_v = torch.linalg.qr(c.reshape(n, heads, -1).mT, mode="r").R
    return matrix_measure(r_u @ r_v.mT, measure)
