"""Shannon entropy of next-token distributions, in bits.

H = -sum_v p_v log2 p_v with p = softmax(logits) over the FULL vocabulary. It is computed in fp32 from
``log_softmax`` (never from ``softmax(...).log()``, which underflows to -inf for tiny probabilities), and
in slices along the sequence so a bf16 ``[B, T, V]`` tensor with a 150k vocabulary is never copied to
fp32 all at once.

One formula, :func:`entropy_bits_of_log_probs`, is the entropy everywhere: :func:`entropy_bits_from_logits` (every
position), :func:`scored_token_entropy_bits` (aligned to *token* positions: the entropy reported at a scored token
``j`` is that of the distribution it was drawn from, ``logits[:, j - 1]``, the alignment of
:func:`corrpo.inversion.strength.logit_grad_strength`) and the update's log-prob pass
(:func:`corrpo.training.objectives.token_log_probs_and_entropy`), so the CorR-PO term scored on the update's
forward sees bit for bit the entropy a separate scoring pass computes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LN2 = math.log(2.0)


def entropy_bits_of_log_probs(log_probs: Tensor) -> Tensor:
    """``H = -sum_v p_v log2 p_v`` over the last axis from fp32 ``log_softmax`` values (``p = exp(log_probs)``)."""
    return -(log_probs.exp() * log_probs).sum(-1) / _LN2


def entropy_bits_from_logits(logits: Tensor, slice_len: int = 128) -> Tensor:
    """Entropy in bits of ``softmax(logits)`` over the last axis, fp32, for every leading index.

    ``logits`` is ``[..., T, V]``; the computation is sliced along ``T`` (``slice_len`` positions at a time)
    to bound the fp32 working copy. Gradients are not tracked (this is a diagnostic, not a loss).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be at least [T, V], got shape {tuple(logits.shape)}")
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    n = logits.shape[-2]
    with torch.no_grad():
        for start in range(0, n, slice_len):
            chunk = logits[..., start : start + slice_len, :].detach().float()
            out[..., start : start + slice_len] = entropy_bits_of_log_probs(torch.log_softmax(chunk, dim=-1))
    return out


def scored_token_entropy_bits(logits: Tensor, token_mask: Tensor) -> Tensor:
    """Entropy in bits aligned to scored TOKEN positions, ``[B, T]`` fp32, NaN where not scored.

    Token ``j`` (``j >= 1``) is scored when ``token_mask[:, j]``; its entropy is that of ``logits[:, j - 1]``,
    the distribution token ``j`` was predicted from. Position 0 is never scored (nothing predicts it).
    NaN (not 0) marks unscored positions, matching :func:`corrpo.inversion.strength.logit_grad_strength`,
    so ``torch.isfinite`` recovers the mask and a stray mean cannot silently absorb padding.
    """
    if logits.shape[:-1] != token_mask.shape:
        raise ValueError(
            f"token_mask shape {tuple(token_mask.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}"
        )
    out = torch.full(token_mask.shape, float("nan"), dtype=torch.float32, device=logits.device)
    if token_mask.shape[1] < 2:
        return out
    ent = entropy_bits_from_logits(logits[:, :-1])
    scored = token_mask[:, 1:].bool()
    out[:, 1:] = torch.where(scored, ent, out[:, 1:])
    return out
