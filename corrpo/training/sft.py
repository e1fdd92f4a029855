"""One SFT step as plain code: mean NLL over the completion tokens of a batch of traces, then one update.

Prompt tokens are context, not targets (``loss_mask`` from :func:`corrpo.models.batching.encode_sft_batch`). The mean
is over every rank's completion tokens: each rank (and each of its micro-batches) divides its token sum by the token
count averaged over ranks, and DDP averages the gradients, so a step equals one process's token mean over the whole
batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from corrpo.models.batching import ChatPrompt, PromptFormat, encode_sft_batch
from corrpo.models.packing import forward_logits
from corrpo.training.collectives import SINGLE_PROCESS, Collectives
from corrpo.training.config import SFTConfig
from corrpo.training.forward import row_chunks
from corrpo.training.objectives import token_log_probs
from corrpo.training.schedule import warmup_cosine_lr
from corrpo.training.update import UpdateOutcome, apply_update


@dataclass
class SFTContext:
    """What an SFT step acts on: the policy, its tokenizer and optimizer, how prompts are encoded, and the ranks
    (the SFT counterpart of :class:`corrpo.training.grpo.RLContext`)."""

    policy: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    prompt_format: PromptFormat | bool = False
    """How prompts are rendered (:class:`corrpo.models.batching.PromptFormat`; a bool is ``use_chat_template``)."""
    collectives: Collectives = SINGLE_PROCESS
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    """Lightning's ``manual_backward`` inside a Trainer."""


@dataclass
class SFTStepResult:
    """What one SFT step produced, for logging."""

    loss: torch.Tensor
    """Token-mean NLL over the batch's completion tokens (detached)."""
    update: UpdateOutcome


def sft_step(
    context: SFTContext, config: SFTConfig, prompts: list[ChatPrompt], completions: list, step: int
) -> SFTStepResult:
    """NLL of ``completions`` given ``prompts`` (token mean), one update at SFT step ``step``'s learning rate.
    Prompts and completions are text or message lists (TRL's conversational format; the completion's tokens are
    those :func:`corrpo.models.batching.format_completion` gives).

    With ``config.micro_batch_size`` the rows go through forward/backward that many at a time (each cut to its
    longest row) and the gradients accumulate; every chunk divides by the WHOLE batch's token count, so the
    update is the full-batch one.
    """
    policy, collectives = context.policy, context.collectives
    device = next(policy.parameters()).device
    enc = encode_sft_batch(context.tokenizer, prompts, completions, config.max_length, context.prompt_format)
    enc = {k: v.to(device) for k, v in enc.items()}
    mask = enc["loss_mask"][:, 1:]
    num_tokens = collectives.mean(mask.sum().float()).clamp(min=1.0)

    def losses():
        for rows in row_chunks(len(prompts), config.micro_batch_size):
            width = int(enc["attention_mask"][rows].sum(1).max())  # right padding: later columns change nothing
            ids, attention = enc["input_ids"][rows, :width], enc["attention_mask"][rows, :width]
            logits = forward_logits(policy, ids, attention, packed=config.packing)
            nll = -token_log_probs(logits[:, :-1], ids[:, 1:])
            yield (nll * mask[rows, : width - 1]).sum() / num_tokens

    lr = warmup_cosine_lr(config.lr, step, config.steps, config.warmup_steps, config.min_lr_ratio)
    update = apply_update(losses(), context.optimizer, policy, lr, config.max_grad_norm, collectives, context.backward)
    return SFTStepResult(loss=update.loss, update=update)
