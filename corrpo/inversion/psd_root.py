"""``trace(G^(1/2))`` of a batch of PSD Gram matrices: K's nuclear norm without one eigen-solver call per token.

The nuclear norm of ``M`` is ``sum_i sqrt(lambda_i(G))`` for its Gram ``G = M M^T``. Two solvers
(``strength.k_solver``):

* ``eigh``: ``torch.linalg.eigvalsh`` (fp64), the reference. LAPACK (CPU) and cuSOLVER (CUDA, beyond 32 x 32)
  solve the batch one matrix at a time.
* ``batched``: the coupled Newton-Schulz iteration for the matrix square root in batched fp64 matmuls, on
  ``A = G / ||G||_F`` (eigenvalues in ``[0, 1]``, at least one of them ``>= 1 / sqrt(n)``)::

      Y_0 = A, Z_0 = I;   T_k = (3 I - Z_k Y_k) / 2,   Y_{k+1} = Y_k T_k,   Z_{k+1} = T_k Z_k

  ``Y_k -> A^(1/2)``, ``Z_k -> A^(-1/2)`` on the range of ``A``; the result is ``trace(Y_k) ||G||_F^(1/2)``.
  Three ``n``-square matmuls a step, no inverse and no eigen-solve, so the whole batch runs as a few large
  ``bmm`` calls.

**Accuracy bound.** Every iterate is a polynomial in ``A``: on an eigenvalue ``lambda`` the iteration is scalar,
``y_k = sqrt(lambda p_k)`` with ``p_0 = lambda``, ``p_{k+1} = p_k (3 - p_k)^2 / 4``, increasing from ``lambda``
to 1, so ``trace(Y_k)`` UNDER-estimates the root and each eigenvalue misses ``e_k(lambda) = sqrt(lambda) (1 -
sqrt(p_k))``, at most ``eps_k = max_{0 <= lambda <= 1} e_k(lambda)`` (about ``0.6 (2/3)^k``: an unconverged
eigenvalue grows 2.25x a step, so only those below ``~(4/9)^k`` miss, and they miss at most their own root;
exact zeros miss nothing). With ``||A||_F = 1`` the norm is ``sum sqrt(lambda_i) >= 1``, so

      relative error  <=  rank(G) * eps_k.

:func:`newton_schulz_steps` picks the fewest steps whose bound meets ``tol`` (1e-4 by default: 32 steps for a
128-square Gram of full rank, 26 at rank 8); the bound holds for any spectrum, and on the K Grams the code
produces (nearly rank-deficient, decaying spectra) the error is orders of magnitude below it
(``tests/test_psd_root.py``). Rounding: fp64, and ``A``'s rounding-level negative eigenvalues (``~1e-16``) grow
at most 2.25x a step, ``~1e-16 * 2.25^k`` (< 1e-4 of the top eigenvalue for ``k <= 40``).

Cost: ``6 k n^3`` flops a matrix (``k ~ 32``) against LAPACK's ``~4 n^3`` per-matrix solve: on a CPU the
eigen-solver is faster (the benchmark says by how much), on a GPU the matmuls run at the device's full rate in
one launch per step. ``auto`` takes ``batched`` on CUDA and ``eigh`` elsewhere (:func:`resolve_solver`).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from corrpo.inversion.strength_config import K_SOLVERS

MAX_STEPS = 40
"""No more Newton-Schulz steps than this (rounding's negative eigenvalues grow 2.25x a step)."""


@cache
def _eps() -> tuple[float, ...]:
    """``eps_k`` for ``k = 0 .. MAX_STEPS``: the worst miss of one eigenvalue after ``k`` steps (module docstring),
    the scalar recursion evaluated on a fine logarithmic grid of ``lambda`` in ``[1e-40, 1]``."""
    lam = torch.logspace(-40, 0, 40001, dtype=torch.float64)
    p = lam.clone()
    out = [1.0]
    for _ in range(MAX_STEPS):
        p = p * (3 - p).square() / 4
        out.append((lam.sqrt() - (p * lam).sqrt()).max().item() * 1.01)  # 1% over the grid's maximum
    return tuple(out)


def newton_schulz_steps(rank: int, tol: float) -> int:
    """The fewest steps ``k`` with ``rank * eps_k <= tol`` (at most :data:`MAX_STEPS`)."""
    eps = _eps()
    for k, e in enumerate(eps):
        if rank * e <= tol:
            return k
    return MAX_STEPS


def error_bound(rank: int, steps: int) -> float:
    """The relative error bound ``rank * eps_steps`` of :func:`trace_sqrt_batched`."""
    return rank * _eps()[min(steps, MAX_STEPS)]


def trace_sqrt_batched(gram: Tensor, rank: int | None = None, tol: float = 1e-4) -> Tensor:
    """``trace(G^(1/2))`` of PSD ``gram [..., n, n]`` (fp64) by coupled Newton-Schulz, relative error at most
    ``tol`` for Grams of rank at most ``rank`` (default ``n``). Returns ``[...]`` fp64."""
    n = gram.shape[-1]
    g = gram.double()
    scale = torch.linalg.matrix_norm(g, ord="fro")  # [...]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = g / safe[..., None, None]
    eye = torch.eye(n, dtype=g.dtype, device=g.device).expand_as(y)
    z = eye
    for _ in range(newton_schulz_steps(min(rank or n, n), tol)):
        t = 1.5 * eye - 0.5 * (z @ y)
        y, z = y @ t, t @ z
    return torch.where(scale > 0, y.diagonal(dim1=-2, dim2=-1).sum(-1) * safe.sqrt(), torch.zeros_like(scale))


def resolve_solver(solver: str, device: torch.device) -> str:
    """``auto`` -> ``batched`` on CUDA (batched matmuls against a per-matrix cuSOLVER loop), ``eigh`` elsewhere
    (LAPACK's per-matrix solve beats ~32 Newton-Schulz steps on a CPU); ``eigh`` / ``batched`` as given."""
    if solver not in K_SOLVERS:
        raise ValueError(f"unknown k_solver {solver!r}; expected one of {K_SOLVERS}")
    if solver == "auto":
        return "batched" if device.type == "cuda" else "eigh"
    return solver


def gram_nuclear(gram: Tensor, solver: str = "eigh", rank: int | None = None) -> Tensor:
    """``sum_i sqrt(lambda_i(G))`` of PSD ``gram [..., n, n]`` as fp32: the nuclear norm of any ``M`` with
    ``M M^T = G``, by ``eigh`` (the reference) or ``batched`` (:func:`trace_sqrt_batched`, relative error <= 1e-4
    for rank <= ``rank``); ``auto`` resolves on ``gram``'s device (:func:`resolve_solver`)."""
    solver = resolve_solver(solver, gram.device)
    if solver == "batched" and gram.shape[-1] > 1 and gram.numel() > 0:
        return trace_sqrt_batched(gram, rank).float()
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(-1).float()
