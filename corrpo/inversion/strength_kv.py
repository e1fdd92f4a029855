"""The last layer's V and K strengths in closed form, for :mod:`corrpo.inversion.strength_onepass`.

V and K mix positions, so their per-token gradient is not rank 1; it is exact all the same, from the one backward's
cotangent at the attention output ``g`` and the captured queries, keys and values:

* v_proj (mixes positions): ``ctx_{t,h} = sum_s P_{h,t,s} (W_v x_s + b)_{kv(h)}`` so
  ``dz_t/dW_v[kv] = sum_{h in kv} g_{t,h} c_{t,h}^T`` with ``g_{t,h} = dz_t/dctx_{t,h}`` (exact from the
  one backward) and ``c_{t,h} = sum_s P_{h,t,s} x_s`` (``x`` = the normed layer input). Rank <= #heads.
* k_proj (mixes positions, RoPE): with ``dS_{h,t,s} = P_{h,t,s} (g_{t,h}.v_s - g_{t,h}.ctx_{t,h})`` the
  softmax backward, the gradient w.r.t. the rotated key is ``kt_{t,s} = scale sum_{h in kv} dS_{h,t,s}
  q~_{t,h}``; undoing RoPE (its transpose: ``y cos - rotate_half(y sin)``) gives ``gk_{t,s}`` and
  ``dz_t/dW_k = sum_s gk_{t,s} x_s^T``. Cost O(T^2 d) per token block; built in chunks.

``P`` is recomputed from the captured q, k and RoPE cos/sin with the causal + key-padding mask (and the
layer's sliding window, ``s > t - window`` in sequence indices as transformers' mask has it), so the result
does not depend on the attention backend (eager/SDPA). GQA is handled by grouping query heads by their kv
head. Biases are not scored (weights only); q/k/v biases enter only through the captured outputs.

K's measure (:mod:`corrpo.inversion.strength_k`) takes the cheapest exact route at each key range (:func:`k_route`),
built in token groups of bounded size; V's contexts are batched over row
groups within an element budget (:data:`V_BATCH_ELEMENTS`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from corrpo.inversion.strength_common import LayerCapture, ScoringBatch, matrix_measure
from corrpo.inversion.strength_config import StrengthConfig
from corrpo.inversion.strength_k import k_block_measures, k_measure, k_route
from corrpo.models.architectures import DecoderParts
from corrpo.models.families import head_counts

__all__ = ["k_measure", "k_route", "kv_strengths"]  # K's measure lives in strength_k; re-exported


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the first ``cos.shape[-1]`` dims of each head (all of them unless partial), as transformers."""
    rot = cos.shape[-1]
    head, rest = x[..., :rot], x[..., rot:]
    return torch.cat((head * cos + _rotate_half(head) * sin, rest), dim=-1)


def _normed(norm: nn.Module | None, x: Tensor, flat: bool) -> Tensor:
    """Apply the family's q/k norm to heads ``x [..., heads, hd]`` (per head, or over the flattened vector)."""
    if norm is None:
        return x
    return norm(x.flatten(-2)).view_as(x) if flat else norm(x)


def _norm_transpose(norm: nn.Module | None, x: Tensor, cot: Tensor, flat: bool) -> Tensor:
    """``J_norm(x)^T cot``: the exact VJP of the (position-wise) norm module at ``x``."""
    if norm is None:
        return cot
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (out,) = torch.autograd.grad(_normed(norm, x, flat), x, cot)
    return out


def kv_strengths(
    parts: DecoderParts,
    attn: nn.Module,
    cap: LayerCapture,
    ctx_grad: Tensor,
    batch: ScoringBatch,
    config: StrengthConfig,
    names: tuple[str, ...],
) -> dict[str, Tensor]:
    """Per-token v / k measures by the closed forms of the module docstring, token-chunked."""
    layout = parts.layout
    n_heads, n_kv, hd = head_counts(parts.config)
    rep, scale = n_heads // n_kv, attn.scaling
    softcap = getattr(attn, "attn_logit_softcapping", None)
    sinks = _sinks(attn, n_kv, rep)
    window = getattr(parts.config if layout.window_from_config else attn, "sliding_window", None)
    flat = layout.qk_norm == "flat"
    q_norm = getattr(attn, "q_norm", None) if layout.qk_norm else None
    k_norm = getattr(attn, "k_norm", None) if layout.qk_norm else None
    x_k, x_v = cap.input("k").detach().float(), cap.input("v").detach().float()  # [B, T, d]
    bsz, seq, _ = x_k.shape
    if layout.rope:
        if cap.rope is None:
            raise ValueError(f"{layout.name}: the last attention got no position_embeddings; use method='vmap'")
        cos, sin = (t.detach().float() for t in cap.rope)  # [B, T, rot]
        if layout.rope_pairs:  # one angle per rotated pair (gpt-oss): the rotate_half form repeats it
            cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    else:  # no rotation: cos = 1, sin = 0 on zero rotated dims
        cos = sin = x_k.new_zeros(bsz, seq, 0)
    with torch.no_grad():
        q = _normed(q_norm, cap.output("q").detach().float().view(bsz, seq, n_heads, hd), flat)
        k_raw = cap.output("k").detach().float().view(bsz, seq, n_kv, hd)
        k = _normed(k_norm, k_raw, flat)
    q = q.view(bsz, seq, n_kv, rep, hd)
    v = cap.output("v").detach().float().view(bsz, seq, n_kv, hd)
    k_rot = rope(k, cos[:, :, None], sin[:, :, None])
    g_all = ctx_grad.float().view(bsz, seq, n_kv, rep, hd)
    key_ok = batch.attention_mask.bool()
    arange = torch.arange(seq, device=x_k.device)
    if "k" not in names:  # v alone needs only each token's attention context: every token at once, no block loop
        q_tok = q[batch.rows, batch.cols - 1]
        c = _v_contexts(q_tok, k_rot, x_v, cos, sin, batch, scale, softcap, window, sinks)
        return {"v": v_measure(g_all[batch.rows, batch.cols - 1], c, config.measure)}
    out: dict[str, list[Tensor]] = {"k": [], "v": []}
    v_parts: list[tuple[Tensor, Tensor]] = []  # (g, c) per block: v's measure runs once over all tokens
    for b, pos in row_blocks(batch, config.chunk_size):
        # every token of the block reads row b's keys/values up to the block's last position only (causal):
        # shared [S, ...] operands instead of one gathered copy per token, and no work past position S - 1
        S = int(pos.max()) + 1
        lo = block_key_start(batch, b, pos, S)
        q_rot = rope(q[b, pos], cos[b, pos][:, None, None], sin[b, pos][:, None, None])  # [n, kv, rep, hd]
        raw = torch.einsum("nkre,ske->nkrs", q_rot, k_rot[b, lo:S]) * scale
        allowed = allowed_keys(arange[lo:S], pos, key_ok[b, None, lo:S], window)  # [n, S - lo]
        probs = attention_probs(raw, allowed[:, None, None, :], softcap, sinks)
        g = g_all[b, pos]  # [n, kv, rep, hd]
        if "v" in names:
            v_parts.append((g, torch.einsum("nkrs,sd->nkrd", probs, x_v[b, lo:S])))
        if "k" in names:
            gv = torch.einsum("nkre,ske->nkrs", g, v[b, lo:S])
            d_scores = softmax_backward(probs, gv)
            if softcap is not None:
                d_scores = d_scores * (1 - torch.tanh(raw / softcap).square())
            pull = None
            if k_norm is not None:  # the k-norm's VJP at the group's keys (b, lo .. lo + end - 1)

                def pull(gk: Tensor, end: int, kr: Tensor = k_raw[b, lo:S]) -> Tensor:
                    return _norm_transpose(k_norm, kr[:end].expand_as(gk), gk, flat)

            cos_t, sin_t = cos[b, lo:S].mT.contiguous(), sin[b, lo:S].mT.contiguous()
            out["k"].append(
                k_block_measures(
                    d_scores,
                    q_rot,
                    scale,
                    cos_t,
                    sin_t,
                    x_k[b, lo:S],
                    pos - lo + 1,
                    config.measure,
                    config.k_solver,
                    pull,
                )  # fmt: skip
            )
    if v_parts:  # per token, so batching the blocks' tokens changes no value, only the number of small ops
        out["v"].append(v_measure(*(torch.cat(t) for t in zip(*v_parts, strict=True)), config.measure))
    return {n: torch.cat(vals) for n, vals in out.items() if vals}


V_BATCH_ELEMENTS = 1 << 24
"""At most about this many score (and context) elements at once in :func:`_v_contexts` (64 MB in fp32)."""


def allowed_keys(keys: Tensor, pos: Tensor, key_ok: Tensor, window: int | None) -> Tensor:
    """Which ``keys`` (positions) the queries at ``pos`` attend to: causal, real keys, inside the window."""
    allowed = (keys <= pos[..., None]) & key_ok
    if window is not None:
        allowed &= keys > pos[..., None] - window
    return allowed


def _sinks(attn: nn.Module, n_kv: int, rep: int) -> Tensor | None:
    """gpt-oss's per-head sink logits ``[kv, rep, 1]`` (``attn.sinks``), or None."""
    sinks = getattr(attn, "sinks", None)
    return None if sinks is None else sinks.detach().float().view(n_kv, rep, 1)


def attention_probs(raw: Tensor, allowed: Tensor, softcap: float | None, sinks: Tensor | None = None) -> Tensor:
    """The attention weights from the scaled raw scores: the family's soft-cap, the mask, softmax over keys.

    Attention sinks (gpt-oss): one more logit per head in the softmax's denominator, whose weight is dropped (it
    has no value). The closed forms hold unchanged with these weights: a sink adds no term to the context, and the
    softmax backward ``P (g.v_s - g.ctx)`` over the real keys is the same expression."""
    scores = raw if softcap is None else torch.tanh(raw / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return scores.softmax(-1)
    sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
    return torch.cat((scores, sink), -1).softmax(-1)[..., :-1]


def _v_contexts(
    q: Tensor,
    k_rot: Tensor,
    x_v: Tensor,
    cos: Tensor,
    sin: Tensor,
    batch: ScoringBatch,
    scale: float,
    softcap: float | None,
    window: int | None,
    sinks: Tensor | None = None,
) -> Tensor:
    """``c [N, kv, rep, d]``: each scored token's attention-weighted v_proj INPUTS ``sum_s p_{n,h,s} x_s`` (what
    V's closed form needs), for every token of a group of rows at once: row ``b``'s tokens padded to the longest
    row's count and scored against all of row ``b``'s keys, the keys a token may not see masked (causal, padding,
    window, and in a packed row every other sequence's: ``batch.segments``). The same weights as the per-block
    loop of :func:`kv_strengths` (masked keys weigh exactly 0), in a handful of large ops instead of a dozen small
    ones per block. Memory: a row's tokens go in pieces, pieces in groups, of at most :data:`V_BATCH_ELEMENTS`
    score elements."""
    rows, pos = batch.rows, batch.cols - 1
    bsz, seq = batch.input_ids.shape
    n, n_kv, rep, _ = q.shape
    q_rot = rope(q, cos[rows, pos][:, None, None], sin[rows, pos][:, None, None])  # [N, kv, rep, hd]
    per_token = n_kv * rep * max(seq, x_v.shape[-1])  # score (or context) elements of one token
    # a row's tokens in pieces of at most `width`, so one piece stays within the budget however long the row
    counts = torch.bincount(rows, minlength=bsz)
    width = max(1, min(int(counts.max()), V_BATCH_ELEMENTS // per_token))
    slot = torch.arange(n, device=rows.device) - (counts.cumsum(0) - counts)[rows]  # index within its row
    pieces = (counts + width - 1) // width
    piece = (pieces.cumsum(0) - pieces)[rows] + slot // width  # each token's piece; pieces are row-major
    piece_row = torch.repeat_interleave(torch.arange(bsz, device=rows.device), pieces)
    keys = torch.arange(seq, device=rows.device)
    key_ok = batch.attention_mask.bool()
    out = x_v.new_empty(n, n_kv, rep, x_v.shape[-1])
    group = max(1, V_BATCH_ELEMENTS // (width * per_token))
    for p0 in range(0, len(piece_row), group):
        p1 = min(len(piece_row), p0 + group)
        idx = ((piece >= p0) & (piece < p1)).nonzero().squeeze(1)
        at = (piece[idx] - p0, slot[idx] % width)
        of = piece_row[p0:p1]  # the row of each piece
        q_pad = q_rot.new_zeros(p1 - p0, width, *q_rot.shape[1:])
        q_pad[at] = q_rot[idx]
        pos_pad = pos.new_zeros(p1 - p0, width)
        pos_pad[at] = pos[idx]
        allowed = allowed_keys(keys, pos_pad, key_ok[of, None, :], window)  # [pieces, width, T]
        if batch.segments is not None:  # a packed row: only the token's own sequence
            seg = batch.segments[of]
            allowed &= seg[:, None, :] == seg.gather(1, pos_pad)[:, :, None]
        real = torch.zeros_like(pos_pad, dtype=torch.bool)
        real[at] = True
        allowed[~real] = keys == 0  # padded slots see key 0 alone (no empty softmax); they are dropped below
        raw = torch.einsum("bnkre,bske->bnkrs", q_pad, k_rot[of]) * scale
        probs = attention_probs(raw, allowed[:, :, None, None, :], softcap, sinks)
        out[idx] = torch.einsum("bnkrs,bsd->bnkrd", probs, x_v[of])[at]
    return out


def block_key_start(batch: ScoringBatch, b: int, pos: Tensor, end: int) -> int:
    """The first key column of row ``b``'s block ``pos`` (keys up to ``end``): 0, or in a packed row the first
    column of the one sequence the block belongs to."""
    return 0 if batch.segments is None else int((batch.segments[b, :end] != batch.segments[b, pos[0]]).sum())


def softmax_backward(probs: Tensor, grad_probs: Tensor) -> Tensor:
    """The scores' gradient from the probabilities' through a softmax over the last axis:
    ``dL/ds = p * (dL/dp - sum(p * dL/dp))``."""
    return probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))


def row_blocks(batch: ScoringBatch, size: int) -> list[tuple[int, Tensor]]:
    """The scored tokens as ``(row, positions)`` blocks of at most ``size`` tokens of ONE row and sequence each, in the
    order of ``batch.rows`` / ``batch.cols`` (row-major): ``positions`` are the predicting columns ``j - 1``."""
    blocks = []
    rows, pos = batch.rows.tolist(), batch.cols - 1
    # a packed row holds several sequences: a block never spans two (their keys are apart)
    seqs = rows if batch.segments is None else batch.segments[batch.rows, batch.cols].tolist()
    start = 0
    while start < len(rows):
        stop = start
        while stop < len(rows) and rows[stop] == rows[start] and seqs[stop] == seqs[start] and stop - start < size:
            stop += 1
        blocks.append((rows[start], pos[start:stop]))
        start = stop
    return blocks


def v_measure(g: Tensor, c: Tensor, measure: str) -> Tensor:
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
