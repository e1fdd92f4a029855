"""Padding-free training forwards: a batch's sequences packed into fewer rows, logits returned in the batch's layout.

Why: a padded batch spends a forward and a backward on every pad slot. The embedded default's SFT batches are
about 75% real tokens (right padding to the longest trace) and its RL batches less (left-padded prompts,
right-padded completions of 1 to ``max_new_tokens`` tokens). Packing puts the real tokens of several sequences
side by side in one row, so the matmuls run over real tokens.

Exact, not approximate: row ``i``'s real tokens (``attention_mask == 1``, in order) become one segment of a packed
row with positions ``0 .. n_i - 1`` -- the positions :func:`corrpo.models.forward.position_ids_from_mask` gives them in
the padded forward -- and the model is called with those ``position_ids`` and no attention mask. transformers
then reads the segments off the positions (``masking_utils.find_packed_sequence_indices``: a new segment wherever
the position does not grow by 1) and builds a block-diagonal causal mask, so every token attends to exactly the
tokens of its own sequence it attends to when padded. Pad slots at a row's end get position 0 each: every one is
its own segment and reaches nothing real. The final hidden states are gathered back into the padded layout at
the input of the output embedding (a forward pre-hook), so the logits come back as ``[B, keep, V]`` with the
last ``keep`` positions of each padded row (0 = all); pad positions get the unembedding of a zero vector.

Whether a model honours packed positions is checked, not assumed: :func:`packing_unsupported_reason` checks on a
short input, once per model, that packed sequences do not see each other and give the padded forward's logits (a
family that ignores ``position_ids`` in its mask, or a wrapper that drops them, falls back to the padded forward
with a warning).

Row width: a sequence is never split. Widths ``k x longest`` for ``k`` in :data:`WIDTH_FACTORS` are tried and the
one with the least estimated cost ``rows x width x (1 + width / (6 d))`` kept: ``24 d^2`` multiply-adds a token in
a layer's matmuls against ``4 width d`` in its attention (a wider row packs more, but attends further).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from corrpo.models.forward import eval_mode, padded_logits

logger = logging.getLogger(__name__)

WIDTH_FACTORS = (1.0, 1.5, 2.0, 3.0)
"""Candidate row widths, in multiples of the batch's longest sequence."""
PACKING_CHECK_TOLERANCE = 1e-4
"""fp32/fp64: the largest relative difference between packed and padded logits in
:func:`packing_unsupported_reason`'s check."""


def first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """Sequence indices grouped into rows of at most ``width`` tokens: longest first, each into the first row it
    fits (first-fit decreasing, at most 11/9 of the fewest rows plus one)."""
    if any(n > width for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a packed row of {width}")
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[index] <= room:
                rows[r].append(index)
                free[r] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(width - lengths[index])
    return rows


def packed_width(lengths: list[int], hidden_size: int) -> tuple[int, list[list[int]]]:
    """The row width (and rows) among ``k x longest`` that minimise ``rows x width x (1 + width / (6 d))``."""
    longest = max(max(lengths), 1)
    best = None
    for factor in WIDTH_FACTORS:
        width = max(longest, int(math.ceil(factor * longest)))
        rows = first_fit_decreasing(lengths, width)
        cost = len(rows) * width * (1.0 + width / (6.0 * hidden_size))
        if best is None or cost < best[0]:
            best = (cost, width, rows)
    return best[1], best[2]


@dataclass
class PackedBatch:
    """A padded batch's real tokens in packed rows, and where each of them came from."""

    input_ids: Tensor
    """``[R, W]`` packed token ids (0 in pad slots)."""
    position_ids: Tensor
    """``[R, W]`` positions within each token's own sequence (0 in pad slots)."""
    source: Tensor
    """``[n_real]`` flat index into the padded ``[B, T]`` batch of each real token."""
    target: Tensor
    """``[n_real]`` flat index into the packed ``[R, W]`` rows of the same tokens."""
    shape: tuple[int, int]
    """``(B, T)`` of the padded batch."""

    @property
    def density(self) -> float:
        """Real tokens over packed slots."""
        return self.source.numel() / max(self.input_ids.numel(), 1)

    @classmethod
    def build(cls, input_ids: Tensor, attention_mask: Tensor, hidden_size: int) -> PackedBatch:
        B, T = input_ids.shape
        real = attention_mask.bool()
        lengths = real.sum(1).tolist()
        width, rows = packed_width(lengths, hidden_size)
        device = input_ids.device
        ids = torch.zeros((len(rows), width), dtype=input_ids.dtype, device=device)
        positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        sources, targets = [], []
        cols = torch.arange(T, device=device)
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                n = lengths[i]
                where = cols[real[i]]
                ids[r, start : start + n] = input_ids[i, where]
                positions[r, start : start + n] = torch.arange(n, device=device)
                sources.append(i * T + where)
                targets.append(r * width + start + torch.arange(n, device=device))
                start += n
        empty = torch.zeros(0, dtype=torch.long, device=device)
        source = torch.cat(sources) if sources else empty
        target = torch.cat(targets) if targets else empty
        return cls(ids, positions, source, target, (B, T))

    def pack(self, padded: Tensor, fill=0) -> Tensor:
        """``[B, T, ...]`` values of the padded layout in the packed ``[R, W, ...]`` one (``fill`` in pad slots)."""
        rows, width = self.input_ids.shape
        flat = padded.reshape(-1, *padded.shape[2:])
        out = flat.new_full((rows * width, *padded.shape[2:]), fill)
        out[self.target] = flat[self.source]
        return out.view(rows, width, *padded.shape[2:])

    @property
    def segments(self) -> Tensor:
        """``[R, W]`` the padded row each packed slot came from; ``-1 - slot`` in pad slots (each its own)."""
        out = -1 - torch.arange(self.input_ids.numel(), device=self.source.device)
        out[self.target] = self.source // self.shape[1]  # a real token's padded row: its flat index // T
        return out.view_as(self.input_ids)

    def padded_index(self) -> Tensor:
        """``[R * W]`` the flat padded ``[B, T]`` index of each packed slot (``-1`` in pad slots)."""
        out = torch.full((self.input_ids.numel(),), -1, dtype=torch.long, device=self.source.device)
        out[self.target] = self.source
        return out

    def unpack(self, packed: Tensor, keep: int = 0) -> Tensor:
        """``[R, W, ...]`` values back into the padded ``[B, T, ...]`` layout (zeros at pads), or its last ``keep``
        columns when ``keep > 0``. Differentiable."""
        B, T = self.shape
        flat = packed.reshape(-1, *packed.shape[2:])
        out = flat.new_zeros((B * T, *packed.shape[2:]))
        out = out.index_copy(0, self.source, flat.index_select(0, self.target)).view(B, T, *packed.shape[2:])
        return out[:, T - keep :] if keep > 0 else out


def model_width(model: nn.Module) -> int:
    """The model's hidden size (the ``d`` of :func:`packed_width`'s cost)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1024)


def packed_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int = 0,
    packed: PackedBatch | None = None,
) -> Tensor:
    """``model``'s logits of a padded batch computed on its packed rows: ``[B, T, V]`` (the last
    ``logits_to_keep`` columns when > 0), equal to the padded forward's at every real position. ``packed``: the
    batch's packing, when the caller needs to know it (the CorR-PO term reads the forward's packed activations)."""
    if packed is None:
        packed = PackedBatch.build(input_ids, attention_mask, model_width(model))
    head = model.get_output_embeddings()

    def gather(_module, args):  # the final hidden states, packed -> the padded layout, before the unembedding
        return (packed.unpack(args[0], logits_to_keep), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False)
    finally:
        handle.remove()
    return out.logits


def forward_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    logits_to_keep: int = 0,
    packed: bool = False,
) -> Tensor:
    """The training forward: ``[B, T, V]`` logits (the last ``logits_to_keep`` positions only when > 0), computed
    on the batch's packed rows when ``packed`` and the model supports it (:func:`packed_logits`, the same values at
    every real position), else on the padded batch (:func:`corrpo.models.forward.padded_logits`)."""
    if packed and packing_unsupported_reason(model) is None:
        return packed_logits(model, input_ids, attention_mask, logits_to_keep)
    return padded_logits(model, input_ids, attention_mask, logits_to_keep)


def _relative(values: Tensor, reference: Tensor) -> float:
    return float((values - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def packing_unsupported_reason(model: nn.Module) -> str | None:
    """None when ``model`` computes packed rows exactly (checked once per model, cached on it); else why not.

    The check (no grad, eval mode, the model's dtype): two sequences of 3 and 5 tokens, padded into a
    ``[2, 5]`` batch and packed into one row of 8 (plus a pad).

    - **No leak**: changing either sequence's tokens must leave the other's packed logits unchanged (within 4
      units of the dtype's rounding; a block-diagonal mask gives exact zeros, a model that lets a packed token
      attend across sequences changes them by far more, in any precision).
    - **The padded values**: the packed logits equal the padded forward's within ``PACKING_CHECK_TOLERANCE`` in
      fp32/fp64, or 64 units of rounding in a low-precision dtype (where the two orders of summation round apart).
    """
    cached = getattr(model, "_corrpo_packing_reason", None)
    if cached is not None:
        return cached or None
    reason = ""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        reason = "the model has no output embedding to gather the packed hidden states at"
    else:
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        param = next(model.parameters())
        ids = (torch.arange(10, device=param.device).view(2, 5) * 7 + 3) % vocab
        others = [ids.clone(), ids.clone()]  # one sequence's tokens changed, then the other's
        for row, changed in enumerate(others):
            changed[row] = (changed[row] + 1) % vocab
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=param.device)
        # eval mode: dropout would make the forwards differ; the mask and the positions do not depend on the mode
        with eval_mode(model), torch.no_grad():
            padded = padded_logits(model, ids, mask).float()
            packed = packed_logits(model, ids, mask)
            eps = torch.finfo(packed.dtype).eps
            packed = packed.float()
            changed = [packed_logits(model, other, mask).float() for other in others]
        real = mask.bool()
        leak = max(_relative(changed[0][1], packed[1]), _relative(changed[1][0][:3], packed[0][:3]))
        diff = _relative(packed[real], padded[real])
        tolerance = PACKING_CHECK_TOLERANCE if eps < 1e-6 else 64 * eps
        if not math.isfinite(leak) or leak > 4 * eps:
            reason = f"a packed sequence's logits change with its neighbour's tokens ({leak:.1e} relative)"
        elif not math.isfinite(diff) or diff > tolerance:
            reason = f"packed logits differ from padded ones by {diff:.1e} (relative) for this model"
    if reason:
        logger.warning("packing is off for this policy (the padded forward is used): %s", reason)
    model._corrpo_packing_reason = reason  # "" = supported
    return reason or None
