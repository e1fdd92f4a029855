r"""``sketch``: per-token squared Frobenius norms from forward-mode JVPs, for every token at once.

For one selected weight matrix ``W`` and a random sign matrix ``V`` (Rademacher: entries +-1, independent),
one Jacobian-vector product of the scored logits along ``V`` gives, for EVERY scored token ``n`` at once,

.. math::
    u_n = \langle \partial z_n / \partial W,\ V \rangle, \qquad
    \mathbb{E}[u_n^2] = \lVert \partial z_n / \partial W \rVert_F^2

(Hutchinson: ``E[V V^T] = I``). Averaging ``k`` independent directions gives an unbiased estimate of every
token's squared Frobenius norm with relative standard deviation at most ``sqrt(2 / k)`` (Rademacher signs
have less variance than Gaussians). Each matrix gets its own ``k`` directions, so the per-matrix norms stay
apart and ``S_n = mean_W sqrt(estimate_W)`` is the same quantity as ``measure="frobenius"`` of the exact
methods (the square root makes it a consistent, slightly low estimate: Jensen).

Cost: ``k`` forward-mode passes per matrix, independent of how many tokens are scored and of depth (``loop``
and ``vmap`` cost one backward per token); ``chunk_size`` directions run as one ``torch.func.vmap``-batched
JVP. The directions come from a generator seeded with
``sketch_seed``, so the same model and probe give the same estimate every time (a smooth emergence curve).

Exactness check: with the ``numel(W)`` standard-basis directions in place of random signs the sum is the
exact squared norm; the tests use that (:func:`sketch_squared_norms` takes explicit directions) and compare
against ``loop``.

Attention runs through PyTorch's math SDPA backend inside the JVPs: the fused CPU/GPU kernels have no
forward-mode derivative.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from corrpo.inversion.strength_common import ScoringBatch, forward_hidden_and_z, scoring_mode
from corrpo.inversion.strength_config import StrengthConfig
from corrpo.models.architectures import DecoderParts, Matrix, decoder_parts, select_matrices, unwrap_adapters

__all__ = ["rademacher_directions", "sketch_squared_norms", "sketch_strength"]


class _ScoredLogits(nn.Module):
    """``batch -> z [N]``, the scored tokens' raw logits, as a module so ``functional_call`` can swap a weight."""

    def __init__(self, parts: DecoderParts) -> None:
        super().__init__()
        self.base, self.unembed, self._parts = parts.base, parts.unembed, parts

    def forward(self, batch: ScoringBatch) -> Tensor:
        return forward_hidden_and_z(self._parts, batch)[1]


def rademacher_directions(
    weight: Tensor, k: int, generator: torch.Generator, support: Tensor | None = None
) -> Iterable[Tensor]:
    """``k`` independent random sign matrices shaped like ``weight`` (drawn one at a time: memory of one).

    ``support`` (bool, ``weight``'s shape): signs only there, zeros elsewhere -- a fused weight's block, so that
    ``<dz/dW, V>`` sees only that block's gradient.
    """
    for _ in range(k):
        signs = (torch.randint(0, 2, weight.shape, generator=generator, device=generator.device) * 2 - 1).to(
            weight.dtype
        )
        yield signs if support is None else signs * support.to(signs.device, signs.dtype)


def _chunks(directions: Iterable[Tensor], size: int) -> Iterator[Tensor]:
    chunk: list[Tensor] = []
    for direction in directions:
        chunk.append(direction)
        if len(chunk) == size:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)


_warned_fallback = False


@contextmanager
def _eager_experts(model: nn.Module) -> Iterator[None]:
    """Forward-mode AD has no rule for torch's ``grouped_mm`` (transformers' default experts kernel): inside, the
    experts run their eager per-expert loop, the same values (``config._experts_implementation``, restored)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_experts_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    config._experts_implementation = "eager"
    try:
        yield
    finally:
        config._experts_implementation = previous


def sketch_squared_norms(
    model: nn.Module, batch: ScoringBatch, weight: nn.Parameter, directions: Iterable[Tensor], chunk_size: int = 64
) -> Tensor:
    """``sum_i <dz_n/dW, V_i>^2`` for every scored token ``n`` -> ``[N]`` fp32 (``W = weight``).

    With ``k`` Rademacher ``V_i``, divide by ``k`` for the unbiased estimate of ``||dz_n/dW||_F^2``; with the
    standard basis of ``W`` it is that squared norm exactly. ``chunk_size`` directions go through one
    ``vmap``-batched JVP (memory: that many copies of the forward's activations); a model op without a
    batching rule falls back to one JVP per direction, with a one-time warning.
    """
    global _warned_fallback
    scored = _ScoredLogits(decoder_parts(model))
    name = next(n for n, p in scored.named_parameters() if p is weight)
    primal = weight.detach()

    def tangent(direction: Tensor) -> Tensor:
        return jvp(lambda w: functional_call(scored, {name: w}, (batch,)), (primal,), (direction,))[1]

    total = torch.zeros(batch.num_scored, dtype=torch.float32, device=primal.device)
    with sdpa_kernel(SDPBackend.MATH), _eager_experts(unwrap_adapters(model)):
        for chunk in _chunks(directions, chunk_size):
            chunk = chunk.to(primal.device, primal.dtype)
            try:
                total += vmap(tangent)(chunk).float().square().sum(0)
            except RuntimeError as err:
                if not _warned_fallback:
                    warnings.warn(f"batched JVP failed ({err}); falling back to one JVP per direction", stacklevel=2)
                    _warned_fallback = True
                for direction in chunk:
                    total += tangent(direction).float().square()
    return total


def _support(matrix: Matrix) -> Tensor | None:
    """Where a fused matrix's block lies in its stored weight (``None``: the whole weight)."""
    if matrix.features is None:
        return None
    weight = matrix.weight
    rows = torch.zeros(weight.shape[-1 if matrix.transposed else -2], dtype=torch.bool, device=weight.device)
    rows[matrix.features.to(weight.device)] = True
    return rows[None, :].expand_as(weight) if matrix.transposed else rows[:, None].expand_as(weight)


def sketch_strength(model: nn.Module, batch: ScoringBatch, config: StrengthConfig) -> tuple[Tensor, Tensor]:
    """``S_n = mean_W sqrt(mean_i <dz_n/dW, V_i>^2)`` with ``config.sketch_dim`` sign matrices per ``W``."""
    parts = decoder_parts(model)
    matrices = select_matrices(model, config.layers, config.projections)
    with scoring_mode(model, []), torch.no_grad():
        hidden, z = forward_hidden_and_z(parts, batch)
        generator = torch.Generator(device=z.device).manual_seed(config.sketch_seed)
        norms = []
        for matrix in matrices:  # a block diagonal's squared norm is its blocks' sum (a shared expert's block)
            squared = 0
            for block in (matrix, *matrix.also):
                directions = rademacher_directions(block.weight, config.sketch_dim, generator, _support(block))
                squared = squared + sketch_squared_norms(model, batch, block.weight, directions, config.chunk_size)
            norms.append((squared / config.sketch_dim).sqrt())
    return torch.stack(norms).mean(0), hidden
