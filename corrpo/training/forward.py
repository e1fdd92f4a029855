"""Logits and completion log-probs of a batch, with positions taken from the attention mask."""

from __future__ import annotations

import torch
from torch import nn

from corrpo.batching import position_ids_from_mask
from corrpo.objectives import token_log_probs
from corrpo.rollout import Rollout


def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, V]`` logits; ``position_ids`` from the mask so left padding never shifts positions."""
    position_ids = position_ids_from_mask(attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def completion_log_probs(model: nn.Module, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[N, L]`` of the completion tokens of ``rollout`` under ``model``, and the logits ``[N, L, V]``
    that produced them (token ``P + j`` is predicted at column ``P + j - 1``)."""
    logits = forward_logits(model, rollout.sequences, rollout.attention_mask)
    logits = logits[:, rollout.prompt_length - 1 : -1]
    return token_log_probs(logits, rollout.completion_ids), logits
