"""Per-token gradient strength ``S_j`` of the raw chosen-token logit, and entropy from the same forward.

For a scored token ``j`` (``token_mask[b, j]``, ``j >= 1``) with chosen token ``y = input_ids[b, j]``, the
raw logit is ``z_j = logits[b, j-1, y]`` (not a log-prob, not a loss): the logit the model OUTPUTS, i.e.
after Gemma 2/3's final soft-capping and Granite's ``/ logits_scaling`` (``families``). For each selected weight matrix
``W`` (config: layers x projections, weights only -- q/k/v biases are ignored; a fused qkv weight counts as its
Q, K and V row blocks)

    S_j = mean_W  measure(dz_j / dW),   measure in {nuclear, frobenius, l1}.

The average over matrices is our choice: the paper does not publish how the Q/K/V/O norms combine.
Exact methods (``loop`` is the reference every other method is tested against):

* ``loop``    -- one backward per token (``strength_loop.loop_strength``);
* ``vmap``    -- batched per-token VJPs, any layers (``strength_loop.vmap_strength``);
* ``onepass`` -- ONE backward for the last layer's q, k, v, o and MLP weights via rank-1 / closed forms
  (``strength_onepass``); the default, ~O(1) backwards instead of O(T).

And one estimator: ``sketch`` -- unbiased per-token squared Frobenius norms from random-sign forward-mode
JVPs, any layers, cost independent of T (``strength_sketch``); tested exact with basis directions.

Outputs are ``[B, T]`` fp32 aligned to TOKEN positions with NaN where a position is not scored (including
tokens whose predecessor is padding). The model is run in eval mode with ``position_ids`` from the
attention mask (left or right padding), locally outside any ``no_grad``/``inference_mode`` of the caller;
grads are taken with ``torch.autograd.grad`` (no ``.grad`` is left on parameters) and the model's training
mode and ``requires_grad`` flags are restored afterwards, so frozen models work too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from corrpo.inversion.entropy import entropy_bits_from_logits
from corrpo.inversion.strength_common import ScoringBatch, check_generic_logits
from corrpo.inversion.strength_config import StrengthConfig
from corrpo.inversion.strength_loop import loop_strength, vmap_strength
from corrpo.inversion.strength_onepass import onepass_strength
from corrpo.inversion.strength_sketch import sketch_strength
from corrpo.models.architectures import decoder_parts

__all__ = ["StrengthConfig", "logit_grad_strength", "score_tokens"]

_METHODS: dict[str, Callable[[nn.Module, ScoringBatch, StrengthConfig], tuple[Tensor, Tensor]]] = {
    "loop": loop_strength,
    "vmap": vmap_strength,
    "onepass": onepass_strength,
    "sketch": sketch_strength,
}


def _run(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    token_mask: Tensor,
    config: StrengthConfig | None,
) -> tuple[ScoringBatch, Tensor, Tensor]:
    config = config or StrengthConfig()
    parts = decoder_parts(model)  # architecture check before any work
    # Lightning validation runs under inference_mode, where autograd is impossible: leave it locally and
    # clone the (possibly inference-) input tensors into normal ones.
    with torch.inference_mode(False):
        input_ids = input_ids.clone()
        attention_mask = None if attention_mask is None else attention_mask.clone()
        batch = ScoringBatch.build(input_ids, attention_mask, token_mask.clone())
        check_generic_logits(model, parts, batch)
        values, hidden = _METHODS[config.method](model, batch, config)
        return batch, batch.scatter(values), hidden


def logit_grad_strength(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    token_mask: Tensor,
    config: StrengthConfig | None = None,
) -> Tensor:
    """``S [B, T]`` fp32: gradient strength of each scored token's raw logit, NaN where not scored.

    Args:
        model: a causal LM of a supported family (``corrpo.models.families``; any dtype/device, frozen or not).
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for real tokens (left or right padding); ``None`` = all real.
        token_mask: ``[B, T]`` bool, True at the tokens to score (their logits come from position ``j-1``).
        config: measure / layers / projections / method; defaults to ``StrengthConfig()``.
    """
    return _run(model, input_ids, attention_mask, token_mask, config)[1]


def score_tokens(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    token_mask: Tensor,
    config: StrengthConfig | None = None,
    slice_len: int = 128,
) -> tuple[Tensor, Tensor]:
    """``(entropy_bits [B, T], strength [B, T])`` for the scored tokens, both NaN where not scored.

    The entropy reuses the strength method's forward: the final hidden states are unembedded again without
    grad, ``slice_len`` positions at a time, so no full ``[B, T, V]`` logits tensor is ever kept.
    """
    batch, strength, hidden = _run(model, input_ids, attention_mask, token_mask, config)
    parts = decoder_parts(model)
    with torch.inference_mode(False), torch.no_grad():
        entropy = torch.full_like(strength, float("nan"))
        for start in range(0, hidden.shape[1] - 1, slice_len):
            stop = min(start + slice_len, hidden.shape[1] - 1)
            ent = entropy_bits_from_logits(parts.logits(hidden[:, start:stop]), slice_len=slice_len)
            scored = batch.mask[:, start + 1 : stop + 1]
            entropy[:, start + 1 : stop + 1] = torch.where(scored, ent, entropy[:, start + 1 : stop + 1])
    return entropy, strength
