"""Each response's own correlation ``rho_i = corr(H_t, S_t)`` over its completion tokens, from a scoring pass."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from corrpo.inversion.correlation import batched_pearson, batched_spearman
from corrpo.inversion.strength import score_tokens
from corrpo.training.corrpo_term.config import CorrPOTermConfig


def _trim_left(attention_mask: Tensor) -> int:
    """First column holding a real token in any row (left padding shared by all rows can be dropped)."""
    real_cols = attention_mask.bool().any(dim=0).nonzero()
    return int(real_cols[0]) if real_cols.numel() else 0


def rollout_correlations(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    completion_token_mask: Tensor,
    config: CorrPOTermConfig,
    rows_per_chunk: int = 64,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per response ``i``: ``rho_i = corr(H_t, S_t)`` over its own scored completion tokens ``t``.

    ``H_t`` (entropy, bits) and ``S_t`` (gradient strength) come from one :func:`score_tokens` call per chunk
    of rows with ``token_mask = completion_token_mask`` (sequence coordinates: token ``t`` is predicted at
    ``t - 1``); each row's correlation is then :func:`batched_spearman` / :func:`batched_pearson` over the
    pairs where both are finite. Rows are independent, so chunking (and dropping the left-padding columns a
    chunk shares) changes nothing but memory and time.

    Args:
        model: the policy (any mode/grad state; both are restored by ``score_tokens``).
        sequences: ``[N, S]`` prompt + completion ids (e.g. ``Rollout.sequences``).
        attention_mask: ``[N, S]`` 1 on real tokens.
        completion_token_mask: ``[N, S]`` bool, True on the completion tokens that count.
        config: the strength definition and the correlation kind.
        rows_per_chunk: responses scored per ``score_tokens`` call.

    Returns:
        ``rho [N]`` float64 (NaN where not computable: < 2 tokens or a constant side), ``n_tokens [N]`` long,
        the number of pairs each ``rho_i`` used, and the per-token ``H`` and ``S`` ``[N, S]`` fp32 they were
        formed from (NaN where not scored); all on ``sequences.device``.
    """
    if not (sequences.shape == attention_mask.shape == completion_token_mask.shape) or sequences.ndim != 2:
        raise ValueError(
            "sequences, attention_mask and completion_token_mask must all be [N, S], got "
            f"{tuple(sequences.shape)}, {tuple(attention_mask.shape)}, {tuple(completion_token_mask.shape)}"
        )
    n = sequences.shape[0]
    rho = torch.full((n,), float("nan"), dtype=torch.float64, device=sequences.device)
    n_tokens = torch.zeros(n, dtype=torch.long, device=sequences.device)
    entropies = torch.full(sequences.shape, float("nan"), dtype=torch.float32, device=sequences.device)
    strengths = entropies.clone()
    for start in range(0, n, max(rows_per_chunk, 1)):
        rows = slice(start, min(start + rows_per_chunk, n))
        first = _trim_left(attention_mask[rows])
        ids, mask = sequences[rows, first:], attention_mask[rows, first:]
        tokens = completion_token_mask[rows, first:].bool()
        entropy, strength = score_tokens(model, ids, mask, tokens, config.strength)
        rho[rows], n_tokens[rows] = response_correlations(entropy, strength, tokens, config.correlation)
        entropies[rows, first:], strengths[rows, first:] = entropy, strength
    return rho, n_tokens, entropies, strengths


def response_correlations(entropy: Tensor, strength: Tensor, tokens: Tensor, correlation: str) -> tuple[Tensor, Tensor]:
    """Per row: ``rho = corr(H, S)`` over its ``tokens`` where both are finite (float64, NaN when not
    computable), and the number of pairs (long). The one place a response's correlation is formed, whether
    its ``H`` and ``S`` came from a scoring pass or from the update's own forward."""
    correlate = batched_spearman if correlation == "spearman" else batched_pearson
    pairs = tokens.bool() & entropy.isfinite() & strength.isfinite()
    return correlate(entropy, strength, pairs).double(), pairs.sum(-1)
