"""W_k's per-token measure from a block's softmax backward, for :func:`corrpo.inversion.strength_kv.kv_strengths`.

For a token ``t`` of a block that sees keys ``lo .. S-1`` (one sequence), ``dz_t/dW_k = M_t = sum_s gk_{t,s}
x_s^T`` with ``gk_{t,s} = R_s^T (scale sum_{h in kv} dS_{h,t,s} q~_{t,h})`` (``R_s``: RoPE at key ``s``; the
k-norm's VJP after it where the family has one). :func:`k_block_measures` builds ``gk`` transposed,
``[tokens, kv, hd, S]``, in groups of tokens of at most :data:`K_GROUP_ELEMENTS` elements, each group against the
keys up to its own last token only (a token's gradient is exactly 0 on the keys after it):

* ``q~^T dS`` is one ``bmm`` whose output is already in that layout, RoPE's transpose acts along ``hd`` in four
  half-size fused multiply-adds on the group's buffer (no ``cat`` / ``rotate_half`` copies), and the built route's
  ``M = gk^T X`` reads the buffer as a contiguous ``[tokens * d_kv, S]`` operand of one matmul;
* the group's buffer stays a few MB at any length, so the passes over it run in cache, and the memory of K's
  measure is ``O(chunk_size * T)`` (``d_scores``) beyond the model's own activations, never ``O(T^2)``.

Why: at T = 4k the previous form (``gk [64, S, kv, hd]`` for the whole block, then ``_rope_transpose``'s
``cat``/``mul``/``sub`` copies of that 134 MB tensor) spent more time in those memory passes than in the matmuls,
and grew faster than ``T^2`` as the block fell out of cache.

The route of each group's measure (:func:`k_route`) and the eigen-solver of the nuclear norm
(``strength.k_solver``, :mod:`corrpo.inversion.psd_root`) are chosen per group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from corrpo.inversion.psd_root import gram_nuclear
from corrpo.inversion.strength_common import matrix_measure, nuclear_norm

K_SUB_BLOCK = 16
"""At most this many tokens per K measure: the block's tokens in groups, each against the keys up to its own last
position (smaller eigen-solves for the earlier tokens of a block, one more group per 16 tokens)."""
K_GROUP_ELEMENTS = 1 << 20
"""At most about this many ``gk`` elements per group (4 MB in fp32): fewer tokens per group on long key ranges."""
EIGEN_WEIGHT = 16
"""Matmul multiply-adds one multiply-add of a LAPACK eigen-solve costs here (measured: ``eigvalsh`` at
1.7-3.2 GFLOP/s against 37-100 GFLOP/s for the matmuls on these shapes): the weight of the eigen-solve in the cost
by which :func:`k_measure` picks its route."""


def k_route(S: int, d_kv: int, d: int, measure: str) -> str:
    """The route of least cost for :func:`k_measure` (see there) over ``S`` keys, ``d_kv`` and ``d``."""
    if measure == "l1":
        return "built"
    m = min(d_kv, d)
    routes = {  # fp64 products count twice (half the fp32 rate), fp64 eigen-solves EIGEN_WEIGHT times
        "gram": 2 * (S * S * d_kv + S * d_kv * d_kv) + EIGEN_WEIGHT * d_kv**3,
        "root": 2 * (2 * S * S * d_kv) + EIGEN_WEIGHT * S**3,
        "built": S * d_kv * d + 2 * d_kv * d * m + EIGEN_WEIGHT * m**3,  # M itself in fp32, its Gram in fp64
    }
    return min(routes, key=routes.__getitem__)


def k_measure(gk: Tensor, x: Tensor, measure: str, route: str | None = None, solver: str = "eigh") -> Tensor:
    """Measure of ``M_n = sum_s gk_{n,s} x_s^T = B_n^T X`` (``B_n = gk[n]`` ``[S, d_kv]``, ``X`` ``[S, d]``).

    Three exact routes to the singular values of ``M_n`` (the eigenvalues of a Gram matrix, fp64 as
    :func:`corrpo.inversion.strength_common.nuclear_norm`); with ``K = X X^T`` (once per call, shared by its
    tokens) and ``m = min(d_kv, d)``:

    * ``gram``: ``M_n M_n^T = B_n^T K B_n``, a ``d_kv``-square problem: ``S^2 d_kv + S d_kv^2`` fp64
      multiply-adds a token, and the ``d_kv^3`` eigen-solve;
    * ``root``: with ``R = K^(1/2)`` (one eigen-solve of ``K``), ``C_n = R B_n``: ``C_n C_n^T`` has the nonzero
      eigenvalues of ``B_n^T K B_n``, an ``S``-square problem: ``2 S^2 d_kv`` fp64 and ``S^3``;
    * ``built``: ``M_n`` itself (fp32: an entry's rounding moves a singular value by ~1e-7 of the largest), then
      its smaller Gram: ``S d_kv d`` fp32 + ``d_kv d m`` fp64, and ``m^3``.

    The route of least cost runs, an fp64 multiply-add counted twice and an eigen-solve's :data:`EIGEN_WEIGHT`
    times (LAPACK runs them that much slower than matmuls): key ranges up to about ``d_kv`` take ``root``,
    somewhat longer ones ``gram`` (while ``S`` is well below ``d``), then ``built`` (:func:`k_route`; ``route``
    forces one). The l1 norm needs the entries: ``M_n``. Frobenius is ``sqrt(trace(B^T K B))``. The nuclear norm's
    Gram eigenvalues come from ``solver`` (:func:`corrpo.inversion.psd_root.gram_nuclear`; the Gram's rank is at
    most ``min(S, d_kv, d)``).
    """
    S, d_kv, d = x.shape[0], gk.shape[-1], x.shape[-1]
    route = route or k_route(S, d_kv, d, measure)
    rank = min(S, d_kv, d)
    if route == "built":
        mat = torch.einsum("nse,sd->ned", gk, x)
        return nuclear_norm(mat, solver, rank) if measure == "nuclear" else matrix_measure(mat, measure)
    x64, b = x.double(), gk.double()
    kernel = x64 @ x64.mT
    if route == "gram":
        gram = b.mT @ (kernel @ b)  # [n, d_kv, d_kv]
    else:
        lam, vec = torch.linalg.eigh(kernel)
        c = ((vec * lam.clamp_min(0).sqrt()) @ vec.mT) @ b  # K^(1/2) B, [n, S, d_kv]
        gram = c @ c.mT
    if measure == "frobenius":
        return gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt().float()
    return gram_nuclear(gram, solver, rank)


def rope_transpose_keys_(y: Tensor, cos_t: Tensor, sin_t: Tensor) -> Tensor:
    """``R_s^T y_s`` for every key ``s`` of ``y [..., hd, S]`` (keys last), with ``cos_t``/``sin_t`` ``[rot, S]``:
    the transpose of transformers' RoPE on the first ``rot`` dims, ``y cos - rotate_half(y sin)``, i.e. with
    ``h = rot / 2``: ``out[:h] = y[:h] cos[:h] + y[h:rot] sin[h:rot]``, ``out[h:rot] = y[h:rot] cos[h:rot] -
    y[:h] sin[:h]``. Returns a new tensor (four half-size fused multiply-adds; the dims past ``rot`` copied)."""
    rot = cos_t.shape[0]
    if rot == 0:
        return y
    h = rot // 2
    out = torch.empty_like(y)
    lo, hi = y[..., :h, :], y[..., h:rot, :]
    torch.mul(lo, cos_t[:h], out=out[..., :h, :]).addcmul_(hi, sin_t[h:])
    torch.mul(hi, cos_t[h:], out=out[..., h:rot, :]).addcmul_(lo, sin_t[:h], value=-1)
    if rot < y.shape[-2]:
        out[..., rot:, :] = y[..., rot:, :]
    return out


def k_block_measures(
    d_scores: Tensor,
    q_rot: Tensor,
    scale: float,
    cos_t: Tensor,
    sin_t: Tensor,
    x: Tensor,
    ends: Tensor,
    measure: str,
    solver: str = "eigh",
    pull_back: Callable[[Tensor, int], Tensor] | None = None,
) -> Tensor:
    """W_k's measure ``[n]`` for the ``n`` tokens of one block.

    ``d_scores [n, kv, rep, S]`` (the softmax backward, over the block's keys), ``q_rot [n, kv, rep, hd]`` (the
    rotated queries), ``cos_t``/``sin_t`` ``[rot, S]`` (RoPE at the keys, transposed), ``x [S, d]`` (k_proj's
    inputs), ``ends [n]`` (each token's key count: its keys are ``0 .. ends - 1``). ``pull_back(gk, end)`` maps
    ``gk [g, end, kv, hd]`` through the k-norm's VJP at keys ``0 .. end - 1`` (families with a k-norm)."""
    n, n_kv, rep, S = d_scores.shape
    hd = q_rot.shape[-1]
    group = max(1, min(K_SUB_BLOCK, K_GROUP_ELEMENTS // (n_kv * hd * S)))
    ends_list = ends.tolist()
    out = []
    for i in range(0, n, group):
        end = max(ends_list[i : i + group])
        # gk^T [g, kv, hd, end] = q~^T [g, kv, hd, rep] @ dS [g, kv, rep, end], scaled
        gk_t = torch.matmul(q_rot[i : i + group].transpose(-1, -2), d_scores[i : i + group, ..., :end]).mul_(scale)
        gk_t = rope_transpose_keys_(gk_t, cos_t[:, :end], sin_t[:, :end])
        if pull_back is not None:
            gk_t = pull_back(gk_t.permute(0, 3, 1, 2), end).permute(0, 2, 3, 1)
        gk = gk_t.flatten(1, 2).mT  # [g, end, d_kv], a view: M = gk^T X reads gk_t as one contiguous operand
        out.append(k_measure(gk, x[:end], measure, solver=solver))
    return torch.cat(out)
