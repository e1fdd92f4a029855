"""Text to tensors: SFT batches (right-padded, loss on completion tokens) and RL prompts (left-padded).

Generation needs left padding so every prompt ends at the same column; training forwards then pass
``position_ids`` derived from the attention mask (:func:`corrpo.models.forward.position_ids_from_mask`) so that
padded rows see the same positions as unpadded ones (exactly what ``generate`` does), which keeps old/new
log-probs and inversion scores consistent.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, use_chat_template: bool) -> str:
    """The prompt text the model sees: raw, or wrapped by the tokenizer's chat template as a user turn."""
    if not use_chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("model.use_chat_template is true but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    use_chat_template: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + completion + eos`` with ``loss_mask`` on completion tokens (and eos).

    ``loss_mask[:, j]`` marks token ``j`` as a target: it is predicted by the logits at ``j - 1``.
    Sequences longer than ``max_length`` are cut from the right; a completion cut away entirely leaves a
    row with no targets (it contributes nothing to the loss rather than a NaN). Such rows are silent waste
    (a prompt that fills ``sft.max_length`` trains nothing, loss 0), so they are warned about with their
    count, and a batch in which *no* row has a target is an error: that step would train nothing at all.
    """
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    prompt_ids = _ids(tokenizer, [format_prompt(tokenizer, p, use_chat_template) for p in prompts])
    completion_ids = _ids(tokenizer, completions)
    eos = tokenizer.eos_token_id
    rows = []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        ids = (p + c + [eos])[:max_length]
        targets = ([False] * len(p) + [True] * (len(c) + 1))[:max_length]
        rows.append((ids, targets))
    empty = sum(not any(targets[1:]) for _, targets in rows)  # token 0 is never a target (no logits before it)
    if empty:
        longest = max(len(p) for p in prompt_ids)
        what = f"{empty} of {len(rows)} SFT rows have prompts of >= {max_length} tokens (longest {longest})"
        if empty == len(rows):
            raise ValueError(
                f"sft.max_length={max_length}: all {what}: no completion token is left to train on (0 loss tokens); "
                "raise sft.max_length or shorten the prompts"
            )
        warnings.warn(
            f"sft.max_length={max_length}: {what} and train nothing (0 loss tokens); raise sft.max_length",
            stacklevel=2,
        )
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = torch.tensor(targets)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_prompt_length: int | None = None,
    use_chat_template: bool = False,
) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids; prompts over ``max_prompt_length`` keep their last tokens."""
    if max_prompt_length is not None and max_prompt_length < 1:  # row[-(-5):] would drop 5 tokens of each
        raise ValueError(f"rl.max_prompt_length must be None or > 0, got {max_prompt_length!r}")
    ids = _ids(tokenizer, [format_prompt(tokenizer, p, use_chat_template) for p in prompts])
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to zero tokens")
    if max_prompt_length is not None:
        ids = [row[-max_prompt_length:] for row in ids]
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of real completion tokens (up to and including the first eos) and per-row truncation flags.

    A row with no eos ran out of ``max_new_tokens``: all its tokens count and it is flagged truncated.
    """
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.shape[1] - 1)
    cols = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = cols.unsqueeze(0) <= first_eos.unsqueeze(1)
    return mask, ~has_eos
