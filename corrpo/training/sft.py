"""One SFT step as plain code: mean NLL over the completion tokens of a batch of traces, then one update.

Prompt tokens are context, not targets (``loss_mask`` from :func:`corrpo.batching.encode_sft_batch`). The mean
is over every rank's completion tokens: each rank divides its token sum by the token count averaged over ranks,
and DDP averages the gradients, so a step equals one process's token mean over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corrpo.batching import encode_sft_batch
from corrpo.config import SFTConfig
from corrpo.objectives import token_log_probs
from corrpo.schedule import warmup_cosine_lr
from corrpo.training.collectives import SINGLE_PROCESS, Collectives
from corrpo.training.forward import forward_logits
from corrpo.training.update import UpdateOutcome, apply_update


@dataclass
class SFTStepResult:
    """What one SFT step produced, for logging."""

    loss: torch.Tensor
    """Token-mean NLL over the batch's completion tokens (detached)."""
    update: UpdateOutcome


def sft_step(
    policy: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    config: SFTConfig,
    prompts: list[str],
    completions: list[str],
    step: int,
    use_chat_template: bool = False,
    collectives: Collectives = SINGLE_PROCESS,
    backward=torch.Tensor.backward,
) -> SFTStepResult:
    """NLL of ``completions`` given ``prompts`` (token mean), one update at SFT step ``step``'s learning rate."""
    device = next(policy.parameters()).device
    enc = encode_sft_batch(tokenizer, prompts, completions, config.max_length, use_chat_template)
    enc = {k: v.to(device) for k, v in enc.items()}
    logits = forward_logits(policy, enc["input_ids"], enc["attention_mask"])
    targets = enc["input_ids"][:, 1:]
    mask = enc["loss_mask"][:, 1:]
    nll = -token_log_probs(logits[:, :-1], targets)
    loss = (nll * mask).sum() / collectives.mean(mask.sum().float()).clamp(min=1.0)
    lr = warmup_cosine_lr(config.lr, step, config.steps, config.warmup_steps, config.min_lr_ratio)
    update = apply_update(loss, optimizer, policy, lr, config.max_grad_norm, collectives, backward)
    return SFTStepResult(loss=loss.detach(), update=update)
