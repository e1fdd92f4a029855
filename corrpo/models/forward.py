"""The plain model forward every training and scoring path shares: positions from the mask, no cache, eval mode.

- :func:`position_ids_from_mask`: positions counted over real tokens, so a left- or right-padded row sees the
  positions of its unpadded self (what ``generate`` does); old/new log-probs and inversion scores then agree.
- :func:`padded_logits`: the HF forward of a padded batch with those positions and ``use_cache=False`` (a
  training or scoring forward never reads a KV cache; building one costs memory).
- :func:`eval_mode`: the model in eval mode inside the block, its own mode restored after, even on an error
  (generation, checks and scoring passes must not see dropout, and must not leave a training model in eval).

The padding-free forward built on top of these is :mod:`corrpo.models.packing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: ``cumsum(mask) - 1``, clamped at 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
) -> torch.Tensor:
    """``[B, T, V]`` logits of a padded batch (the last ``logits_to_keep`` positions only when > 0)."""
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep > 0 else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **keep,
    )
    return out.logits


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; the mode it had is restored on exit, whatever happens inside."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
