"""Training forwards: logits and completion log-probs of a batch, positions from the attention mask, no KV cache.

Every forward here passes ``use_cache=False`` (a training or scoring forward never reads a cache; building one
costs memory) and computes log-probs and entropy without an fp32 ``[N, L, V]`` copy of the logits
(:func:`corrpo.training.objectives.token_log_probs_and_entropy`). :func:`row_chunks` splits a batch into micro-batches.
"""

from __future__ import annotations

import torch
from torch import nn

from corrpo.generation.rollout import Rollout
from corrpo.models.packing import forward_logits
from corrpo.training.objectives import token_log_probs_and_entropy


def row_chunks(n_rows: int, micro_batch_size: int | None) -> list[slice]:
    """The row slices of a batch of ``n_rows`` in micro-batches of ``micro_batch_size`` (None: one, the batch)."""
    size = n_rows if micro_batch_size is None else max(1, micro_batch_size)
    return [slice(start, min(start + size, n_rows)) for start in range(0, max(n_rows, 1), max(size, 1))]


def completion_log_probs(
    model: nn.Module,
    rollout: Rollout,
    rows: slice = slice(None),
    packed: bool = False,
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[n, L]`` (fp32, differentiable) of the completion tokens of ``rollout``'s ``rows`` under
    ``model`` at ``temperature``, and their entropy in bits ``[n, L]`` (fp32, no grad; 0 off the completion mask).

    ``temperature``: both come from ``softmax(z / T)``, the distribution the rollout was sampled from, as TRL's
    ``_get_per_token_logps_and_entropies`` and verl compute them; so the importance ratio and the KL are the
    sampling policy's. ``T = 1`` divides nothing (bit for bit the raw logits). ``entropy_grad``: the entropy keeps
    its graph (``rl.entropy_coef``'s bonus backpropagates through it).

    Token ``P + j`` is predicted at column ``P + j - 1``: only the ``L + 1`` last positions are unembedded
    (``logits_to_keep``), so the prompt costs no logits. ``packed``: a padding-free forward
    (:func:`corrpo.models.packing.forward_logits`).
    """
    logits = completion_logits(model, rollout, rows, packed)
    return completion_scores(logits, rollout, rows, temperature, entropy_grad)


def completion_logits(
    model: nn.Module, rollout: Rollout, rows: slice = slice(None), packed: bool = False
) -> torch.Tensor:
    """``[n, L + 1, V]`` logits of the last ``L + 1`` positions of ``rollout``'s ``rows``: the ones that predict
    the completion (column ``P - 1`` on), all an update needs."""
    width = rollout.completion_mask.shape[1] + 1
    return forward_logits(model, rollout.sequences[rows], rollout.attention_mask[rows], width, packed)


def completion_scores(
    logits: torch.Tensor,
    rollout: Rollout,
    rows: slice = slice(None),
    temperature: float = 1.0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`completion_log_probs` from the ``[n, L + 1, V]`` logits of the last ``L + 1`` positions."""
    log_probs, entropy = token_log_probs_and_entropy(
        logits[:, :-1], rollout.completion_ids[rows], temperature, entropy_grad
    )
    return log_probs, entropy.masked_fill(~rollout.completion_mask[rows].bool(), 0.0)
