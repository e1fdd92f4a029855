"""Text to tensors: SFT batches (right-padded, loss on completion tokens) and RL prompts (left-padded).

Generation needs left padding so every prompt ends at the same column; training forwards then pass
``position_ids`` derived from the attention mask (:func:`corrpo.models.forward.position_ids_from_mask`) so that
padded rows see the same positions as unpadded ones (exactly what ``generate`` does), which keeps old/new
log-probs and inversion scores consistent.

A prompt is text (TRL's standard format) or a message list (TRL's conversational format). :func:`format_prompt` is
the one place a prompt becomes the text the model sees, as TRL renders it: a message list always through the
tokenizer's chat template with the generation prompt, text through it only with ``model.use_chat_template``
(:class:`PromptFormat`: also the system prompt and the template's keyword arguments).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

ChatPrompt = str | list[dict[str, Any]]
"""A prompt as the data gives it: text, or a list of ``{"role", "content"}`` messages (TRL's conversational format)."""
RESERVED_TEMPLATE_KWARGS = ("conversation", "tokenize", "add_generation_prompt", "continue_final_message")


@dataclass(frozen=True)
class PromptFormat:
    """How prompts become the text the model sees (``model.use_chat_template``, ``model.system_prompt``,
    ``model.chat_template_kwargs``)."""

    use_chat_template: bool = False
    """Wrap *text* prompts in the tokenizer's chat template as a user turn (message lists always are)."""
    system_prompt: str | None = None
    """A system message put first in every chat-rendered prompt that has none of its own."""
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of ``apply_chat_template`` (e.g. Qwen3's ``enable_thinking: false``)."""

    def __post_init__(self) -> None:
        reserved = sorted(set(self.chat_template_kwargs) & set(RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise ValueError(
                f"model.chat_template_kwargs: {reserved} are set by corrpo (the generation prompt as TRL sets it); "
                "remove them"
            )
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("model.system_prompt is empty: leave it unset for no system message")


def prompt_format(spec: PromptFormat | bool) -> PromptFormat:
    """A :class:`PromptFormat`; a bool (the callers that predate it) is ``use_chat_template``."""
    return spec if isinstance(spec, PromptFormat) else PromptFormat(use_chat_template=bool(spec))


def _chat(prompt: ChatPrompt, fmt: PromptFormat) -> list[dict[str, Any]]:
    """The messages a prompt is rendered from: a text prompt as a user turn, the system prompt first unless the
    prompt brings its own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if fmt.system_prompt is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], fmt: PromptFormat, **flags) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "prompts are rendered with the tokenizer's chat template (message-list prompts always, text prompts with "
            "model.use_chat_template: true), and this tokenizer has none: set tokenizer.chat_template, or use text "
            "prompts with model.use_chat_template: false"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, **flags, **dict(fmt.chat_template_kwargs))


def format_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: ChatPrompt, use_chat_template: PromptFormat | bool = False
) -> str:
    """The prompt text the model sees, as TRL renders it: a message list through the chat template with the
    generation prompt (or, when it ends with an assistant message, continuing that message); a text prompt raw, or
    with ``use_chat_template`` as a user turn of the template. ``use_chat_template`` may be a :class:`PromptFormat`
    (system prompt, template keyword arguments)."""
    fmt = prompt_format(use_chat_template)
    if isinstance(prompt, str) and not fmt.use_chat_template:
        if fmt.system_prompt is not None:
            raise ValueError(
                "model.system_prompt is set but the prompts are text and model.use_chat_template is false: a system "
                "message needs the chat template; set model.use_chat_template: true"
            )
        return prompt
    messages = _chat(prompt, fmt)
    if messages[-1].get("role") == "assistant":  # a prefilled answer: continue it, as TRL does
        return _render(tokenizer, messages, fmt, continue_final_message=True)
    return _render(tokenizer, messages, fmt, add_generation_prompt=True)


def format_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: ChatPrompt,
    completion: str | list[dict[str, Any]],
    use_chat_template: PromptFormat | bool = False,
) -> str:
    """The SFT target text that follows :func:`format_prompt`'s text (an eos follows it in the batch).

    A text completion is itself. A message-list completion (TRL's conversational prompt-completion) is what TRL's
    SFTTrainer trains on: the chat template's rendering of prompt + completion after the rendered prompt, with the
    template's end-of-turn eos (and what follows it) cut, since the batch appends the eos that ends a rollout; where
    the rendered prompt is no prefix of that rendering, the last assistant message's content.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(prompt, str):
        raise ValueError("a message-list completion needs a message-list prompt (TRL's conversational format)")
    fmt = prompt_format(use_chat_template)
    head = format_prompt(tokenizer, prompt, fmt)
    full = _render(tokenizer, _chat(prompt, fmt) + [dict(m) for m in completion], fmt)
    if not full.startswith(head):
        return completion[-1]["content"]
    tail, eos = full[len(head) :].rstrip(), tokenizer.eos_token
    return tail[: -len(eos)] if eos and tail.endswith(eos) else tail


class PromptRenderError(ValueError):
    """A record the tokenizer's chat template cannot render, found at start-up: names the data and the record."""


RENDER_CHECKED = 4
"""Records of each data pool rendered at start-up by :func:`check_prompts_render`."""


def check_prompts_render(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat | bool, pools: dict[str, Sequence[dict[str, Any]]]
) -> None:
    """Render the first :data:`RENDER_CHECKED` records of every pool as training and evaluation will (the prompt by
    :func:`format_prompt`, an SFT completion by :func:`format_completion`), so that a missing or broken chat
    template (a Jinja error, a ``raise_exception`` on a role order) stops the run before any step and before its
    run folder holds anything, not at the first evaluation after SFT. Raises :class:`PromptRenderError` naming the
    pool, the record and the settings to check."""
    for pool, records in pools.items():
        for number, record in enumerate(records[:RENDER_CHECKED], start=1):
            try:
                format_prompt(tokenizer, record["prompt"], fmt)
                if "completion" in record:
                    format_completion(tokenizer, record["prompt"], record["completion"], fmt)
            except Exception as err:  # noqa: BLE001 - Jinja and the template raise anything; the message is the point
                reason = str(err).splitlines()[0][:200] if str(err) else ""
                raise PromptRenderError(
                    f"record {number} of the {pool} data cannot be rendered ({type(err).__name__}: {reason}); check "
                    "the tokenizer's chat_template (model.policy), model.use_chat_template, model.system_prompt and "
                    "model.chat_template_kwargs"
                ) from None


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[ChatPrompt],
    completions: Sequence[str | list[dict[str, Any]]],
    max_length: int,
    use_chat_template: PromptFormat | bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + completion + eos`` with ``loss_mask`` on completion tokens (and eos).

    Prompts and completions are text or message lists (:func:`format_prompt`, :func:`format_completion`);
    ``use_chat_template`` may be a :class:`PromptFormat`.

    ``loss_mask[:, j]`` marks token ``j`` as a target: it is predicted by the logits at ``j - 1``.
    Sequences longer than ``max_length`` are cut from the right; a completion cut away entirely leaves a
    row with no targets (it contributes nothing to the loss rather than a NaN). Such rows are silent waste
    (a prompt that fills ``sft.max_length`` trains nothing, loss 0), so they are warned about with their
    count, and a batch in which *no* row has a target is an error: that step would train nothing at all.
    """
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    fmt = prompt_format(use_chat_template)
    prompt_ids = _ids(tokenizer, [format_prompt(tokenizer, p, fmt) for p in prompts])
    texts = [format_completion(tokenizer, p, c, fmt) for p, c in zip(prompts, completions, strict=True)]
    completion_ids = _ids(tokenizer, texts)
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


def prompt_position_budget(config, max_new_tokens: int) -> int | None:
    """The prompt tokens a model's positions leave for ``max_new_tokens`` new ones: ``max_position_embeddings``
    (``n_positions``) minus ``max_new_tokens``; None when the config states no limit.

    Raises:
        ValueError: the completions alone fill the positions (naming ``rl.sampling.max_new_tokens``).
    """
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int):
        return None
    if max_new_tokens >= positions:
        raise ValueError(
            f"rl.sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"{positions} positions (max_position_embeddings); lower it"
        )
    return positions - max_new_tokens


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[ChatPrompt],
    max_prompt_length: int | None = None,
    use_chat_template: PromptFormat | bool = False,
    position_budget: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded ids of the prompts (text or message lists, rendered by :func:`format_prompt`; ``use_chat_template``
    may be a :class:`PromptFormat`); prompts over ``max_prompt_length`` keep their last tokens.

    ``position_budget`` (:func:`prompt_position_budget`): a prompt longer than the model's positions leave it keeps
    its last tokens too, with a warning (TRL truncates from the left the same way): a 1M-character prompt would
    otherwise sit in attention for many minutes, beyond the positions the model was trained on."""
    if max_prompt_length is not None and max_prompt_length < 1:  # row[-(-5):] would drop 5 tokens of each
        raise ValueError(f"rl.max_prompt_length must be None or > 0, got {max_prompt_length!r}")
    fmt = prompt_format(use_chat_template)
    ids = _ids(tokenizer, [format_prompt(tokenizer, p, fmt) for p in prompts])
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to zero tokens")
    if max_prompt_length is not None:
        ids = [row[-max_prompt_length:] for row in ids]
    if position_budget is not None:
        over = [len(row) for row in ids if len(row) > position_budget]
        if over:
            warnings.warn(
                f"{len(over)} prompt(s) of up to {max(over)} tokens exceed the {position_budget} positions the model "
                "leaves beside rl.sampling.max_new_tokens: each keeps its last tokens (set rl.max_prompt_length to "
                "choose the cut)",
                stacklevel=2,
            )
            ids = [row[-position_budget:] for row in ids]
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
