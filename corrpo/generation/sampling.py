"""The next-token draw of the lean decode loop: HF ``generate``'s logits processors and multinomial, as tensor math.

Functions on ``[rows, V]`` logits, nothing model-specific:

* :func:`penalize_repetitions` with :func:`prompt_tokens_seen`: HF's ``RepetitionPenaltyLogitsProcessor`` (the
  first processor of a sampled call), on the tokens of the prompt (after its left padding) and the completion;
* :func:`next_token_probs`: the distribution HF samples from, ``softmax`` of the logits through HF's
  ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper`` -- their
  values, op for op, in the order ``_get_logits_processor`` appends them;
* :func:`draw_tokens`: one token per computed row, drawn with the random numbers ``torch.multinomial`` would
  consume for the WHOLE batch, so a seeded run draws HF's tokens even after finished rows left the batch.

Why a module of its own: the decode step (:mod:`corrpo.generation.decode_step`) turns weights into logits and the
loop (:mod:`corrpo.generation.decode_loop`) keeps the books; which token comes next, and why it equals HF's, is
this math alone, tested against HF's processors and ``torch.multinomial`` in ``tests/test_fast_decode.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from corrpo.generation.rollout import SamplingConfig


def next_token_probs(
    logits: Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float | None = None
) -> Tensor:
    """``softmax(logits / T)`` restricted as HF's warpers restrict it (``min_tokens_to_keep=1``), in HF's order:
    ``TemperatureLogitsWarper`` (skipped at ``T = 1``, as HF skips it), ``TopKLogitsWarper`` (``top_k > 0``: drop
    the tokens below the k-th largest score), ``TopPLogitsWarper`` (``top_p < 1``: sort ascending, drop the tokens
    whose cumulative probability is ``<= 1 - top_p``, never the most likely one), ``MinPLogitsWarper`` (``min_p``
    set: drop the tokens whose probability is below ``min_p`` times the most likely one's, never that one), then
    softmax. ``[N, V]`` -> ``[N, V]``.

    The warpers' own ops, so from the same logits it gives the distribution HF ``generate`` samples from.
    """
    scores = logits if temperature == 1.0 else logits / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    if min_p is not None:
        probs = scores.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores.softmax(dim=-1)


def prompt_tokens_seen(prompt_ids: Tensor, prompt_mask: Tensor, vocab_size: int) -> Tensor:
    """``[B, V]`` bool: the tokens each prompt holds after its left padding, the ones HF's repetition penalty sees
    (``generate`` ignores the first ``argmax(mask != 0)`` columns of a row; ids ``>= V`` are never penalised)."""
    B, P = prompt_ids.shape
    start = (prompt_mask != 0).int().argmax(dim=1)
    padding = torch.arange(P, device=prompt_ids.device)[None, :] < start[:, None]
    ids = prompt_ids.clamp(max=vocab_size).masked_fill(padding, vocab_size)
    seen = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=prompt_ids.device)
    return seen.scatter_(1, ids, True)[:, :vocab_size]


def penalize_repetitions(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF's ``RepetitionPenaltyLogitsProcessor``: every ``seen`` token's logit ``z`` becomes ``z * penalty`` if
    ``z < 0``, else ``z / penalty`` (CTRL, arXiv 1909.05858); the others are kept. ``[N, V]`` -> ``[N, V]``."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def draw_tokens(logits: Tensor, rows: Tensor, num_rows: int, sampling: SamplingConfig, greedy: bool) -> Tensor:
    """The next token of each row in ``rows`` (``logits``: theirs, ``[len(rows), V]``, after any repetition
    penalty) out of ``num_rows``.

    Greedy: ``argmax``. Sampled: ``torch.multinomial(probs, 1)`` over all ``num_rows`` rows is, in torch's own
    implementation, ``argmax(probs / q)`` with ``q = empty_like(probs).exponential_(1)`` (the exponential-race
    form of Gumbel-max); drawing ``q`` for every row, then using the rows in ``rows``, consumes the RNG exactly as
    HF's ``_sample`` does on the whole batch (finished rows included), so a seeded run draws the same tokens
    as HF ``generate`` although finished rows are no longer computed. ``tests/test_fast_decode.py`` checks that
    this equals ``torch.multinomial`` bit for bit.
    """
    if greedy:
        return logits.argmax(-1)
    probs = next_token_probs(logits, sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p)
    q = torch.empty((num_rows, probs.shape[1]), dtype=probs.dtype, device=probs.device).exponential_(1)
    return (probs / (q if len(rows) == num_rows else q.index_select(0, rows))).argmax(-1)
