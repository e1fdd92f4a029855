"""The next-token draw of the lean decode loop: HF ``generate``'s temperature, top-p and multinomial, as tensor math.

Two functions on ``[rows, V]`` logits, nothing model-specific:

* :func:`next_token_probs`: the distribution HF samples from, ``softmax(logits / T)`` restricted to the top-p
  nucleus -- the values of HF's ``TemperatureLogitsWarper``, ``TopPLogitsWarper`` and softmax, op for op;
* :func:`draw_tokens`: one token per computed row, drawn with the random numbers ``torch.multinomial`` would
  consume for the WHOLE batch, so a seeded run draws HF's tokens even after finished rows left the batch.

Why a module of its own: the decode step (:mod:`corrpo.generation.decode_step`) turns weights into logits and the
loop (:mod:`corrpo.generation.decode_loop`) keeps the books; which token comes next, and why it equals HF's, is
this math alone, tested against HF's warpers and ``torch.multinomial`` in ``tests/test_fast_decode.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from corrpo.generation.rollout import SamplingConfig


def next_token_probs(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """``softmax(logits / T)`` restricted to the nucleus, as HF's ``TemperatureLogitsWarper`` then
    ``TopPLogitsWarper`` (``min_tokens_to_keep=1``) then softmax: sort ascending, drop the tokens whose
    cumulative probability is ``<= 1 - top_p`` (never the most likely one), renormalise. ``[N, V]`` -> ``[N, V]``.

    The warpers' own ops in their order (the division skipped at ``T = 1``, where HF adds no temperature warper;
    the cut taken on the ascending sort, as ``TopPLogitsWarper`` takes it), so from the same logits it gives the
    distribution HF ``generate`` samples from.
    """
    scores = logits if temperature == 1.0 else logits / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores.softmax(dim=-1)


def draw_tokens(logits: Tensor, rows: Tensor, num_rows: int, sampling: SamplingConfig, greedy: bool) -> Tensor:
    """The next token of each row in ``rows`` (``logits``: theirs, ``[len(rows), V]``) out of ``num_rows``.

    Greedy: ``argmax``. Sampled: ``torch.multinomial(probs, 1)`` over all ``num_rows`` rows is, in torch's own
    implementation, ``argmax(probs / q)`` with ``q = empty_like(probs).exponential_(1)`` (the exponential-race
    form of Gumbel-max); drawing ``q`` for every row, then using the rows in ``rows``, consumes the RNG exactly as
    HF's ``_sample`` does on the whole batch (finished rows included), so a seeded run draws the same tokens
    as HF ``generate`` although finished rows are no longer computed. ``tests/test_fast_decode.py`` checks that
    this equals ``torch.multinomial`` bit for bit.
    """
    if greedy:
        return logits.argmax(-1)
    probs = next_token_probs(logits, sampling.temperature, sampling.top_p)
    q = torch.empty((num_rows, probs.shape[1]), dtype=probs.dtype, device=probs.device).exponential_(1)
    return (probs / (q if len(rows) == num_rows else q.index_select(0, rows))).argmax(-1)
