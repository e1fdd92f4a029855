"""Exact per-token gradients from autograd: ``loop`` (the reference) and ``vmap`` (batched VJPs).

Both differentiate the raw logit ``z_n`` of every scored token w.r.t. the selected weight matrices and
average the per-matrix norms. ``loop`` is one ``torch.autograd.grad`` per token -- slow and obviously right;
every fast method is tested against it. ``vmap`` pushes ``chunk_size`` one-hot cotangents through the same
graph at once (``is_grads_batched=True``, i.e. ``torch.func.vmap`` over the backward), which is exact for
any layer set and amortises the Python/kernel-launch overhead of the loop.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from corrpo.inversion.strength_common import (
    ScoringBatch,
    forward_hidden_and_z,
    logical_measure,
    scoring_mode,
)
from corrpo.inversion.strength_config import StrengthConfig
from corrpo.models.architectures import Matrix, decoder_parts, select_matrices, unique_weights


def _mean_measure(
    matrices: list[Matrix], params: list[nn.Parameter], grads: tuple[Tensor, ...], measure: str
) -> Tensor:
    """Mean over the logical matrices of ``measure(dz/dW)``; a fused parameter's grad is split into its blocks, an
    expert stack is measured as its block diagonal (:func:`logical_measure`)."""
    by_param = {id(p): g for p, g in zip(params, grads, strict=True)}
    return torch.stack([logical_measure(m, by_param, measure) for m in matrices]).mean(0)


def loop_strength(model: nn.Module, batch: ScoringBatch, config: StrengthConfig) -> tuple[Tensor, Tensor]:
    """Reference ``S_n = mean_W measure(dz_n / dW)``, one backward per scored token -> (S [N], hidden)."""
    parts = decoder_parts(model)
    matrices = select_matrices(model, config.layers, config.projections)
    params = unique_weights(matrices)
    with scoring_mode(model, params):
        hidden, z = forward_hidden_and_z(parts, batch)
        out = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        for n in range(z.shape[0]):
            grads = torch.autograd.grad(z[n], params, retain_graph=n + 1 < z.shape[0])
            out[n] = _mean_measure(matrices, params, grads, config.measure)
    return out, hidden.detach()


_warned_fallback = False


def vmap_strength(model: nn.Module, batch: ScoringBatch, config: StrengthConfig) -> tuple[Tensor, Tensor]:
    """Batched per-token VJPs, ``chunk_size`` tokens per backward; exact for any layers / projections.

    If an op in the model's backward has no batching rule (``is_grads_batched`` raises), that chunk falls back
    to one backward per token with a one-time warning; results stay exact.
    """
    global _warned_fallback
    parts = decoder_parts(model)
    matrices = select_matrices(model, config.layers, config.projections)
    params = unique_weights(matrices)
    with scoring_mode(model, params):
        hidden, z = forward_hidden_and_z(parts, batch)
        n_tok = z.shape[0]
        out = torch.empty(n_tok, dtype=torch.float32, device=z.device)
        for start in range(0, n_tok, config.chunk_size):
            stop = min(start + config.chunk_size, n_tok)
            idx = torch.arange(start, stop, device=z.device)
            cot = torch.zeros(stop - start, n_tok, dtype=z.dtype, device=z.device)
            cot[idx - start, idx] = 1.0
            try:
                grads = torch.autograd.grad(z, params, grad_outputs=cot, is_grads_batched=True, retain_graph=True)
                out[start:stop] = _mean_measure(matrices, params, grads, config.measure)
            except RuntimeError as err:
                if not _warned_fallback:
                    warnings.warn(f"batched VJP failed ({err}); falling back to per-token backward", stacklevel=2)
                    _warned_fallback = True
                for n in range(start, stop):
                    grads = torch.autograd.grad(z[n], params, retain_graph=True)
                    out[n] = _mean_measure(matrices, params, grads, config.measure)
    return out, hidden.detach()
