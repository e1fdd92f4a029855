"""GRPO-family objective: group advantages, per-token log-probs, the clipped surrogate, KL, aggregation.

Plain tensor functions, one implementation each, called by the module, the benchmarks and the tests.

Notation (TRL's): a batch holds ``B`` prompts x ``G`` completions each, flattened to ``N = B * G`` rows in
prompt-major order (rows ``g*G .. g*G+G-1`` are the completions of prompt ``g``). ``mask [N, L]`` marks the
completion tokens that count in the loss.

What this is and is not: the PPO-style clipped surrogate on group-normalised advantages (no value model,
no GAE), as in DeepSeekMath's GRPO, with the DAPO asymmetric clip (``epsilon_high``), four loss
aggregations (``grpo``, ``dr_grpo``, ``dapo``, ``bnpo``), an optional k3 KL penalty to a frozen reference,
an entropy-quantile token mask (the 80/20 baseline) and the Clip-Cov / KL-Cov variants of the surrogate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from corrpo.inversion.entropy import entropy_bits_of_log_probs
from corrpo.training.covariance_tokens import POLICY_LOSSES, clip_cov_tokens, kl_cov_tokens, token_covariance
from corrpo.training.group_filter import varied_groups

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
RewardScale = Literal["group", "batch", "none"]
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
REWARD_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: RewardScale = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_group(r)) / (std + eps)``.

    ``scale="group"`` divides by the (unbiased) std of the prompt's own group (GRPO), ``"batch"`` by the
    std of all rewards in the batch (more robust for small groups), ``"none"`` does not divide (Dr. GRPO).
    A group whose rewards are all equal gets advantage exactly 0 (the numerator is 0): it carries no
    learning signal, which is why ``frac_reward_zero_std`` is logged.

    A NaN reward marks an unscorable completion (every reward function returned None: TRL's convention): it is
    left out of its group's mean and std (``nanmean`` / TRL's Bessel-corrected ``nanstd``, NaN for fewer than two
    scored values) and its advantage is 0, as TRL's GRPOTrainer does. Without NaN this is the plain arithmetic.

    Args:
        rewards: ``[N]`` total reward per completion, ``N`` divisible by ``group_size``; NaN = unscorable.
        group_size: ``G``, completions per prompt.
    Returns:
        ``[N]`` advantages, same dtype as ``rewards``; finite.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} is not a flat multiple of G={group_size}")
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale_rewards must be one of {REWARD_SCALES}, got {scale!r}")
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain inf; score unscorable samples as NaN (None) and failed ones as 0")
    grouped = rewards.view(-1, group_size)
    unscorable = rewards.isnan()
    if not unscorable.any():
        centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
        if scale == "group":
            std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
            std = std.expand_as(grouped).reshape(-1)
        elif scale == "batch":
            std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    else:
        centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
        if scale == "group":
            std = _nanstd(grouped, dim=1).expand_as(grouped).reshape(-1)
        elif scale == "batch":
            std = _nanstd(rewards.view(1, -1), dim=1).reshape(())
    if scale == "none":
        return torch.nan_to_num(centred, nan=0.0)
    # A zero-variance group has a zero numerator: define its advantage as exactly 0 even when eps = 0.
    advantages = torch.where(centred == 0, torch.zeros_like(centred), centred / (std + eps))
    return torch.nan_to_num(advantages, nan=0.0)


def _nanstd(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The Bessel-corrected std over ``dim`` of the non-NaN entries (NaN where fewer than two), kept dim: TRL's
    ``nanstd``."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Fraction of groups whose rewards are all equal (TRL's ``frac_reward_zero_std``): the groups that carry no
    learning signal. NaN (unscorable) rewards are left out; a group with fewer than two scored rewards counts. The
    test is :func:`corrpo.training.group_filter.varied_groups`, the one dynamic sampling filters with."""
    return (~varied_groups(rewards, group_size)).float().mean()


LOG_PROB_SLICE_ELEMENTS = 1 << 24
"""fp32 working copy of one :class:`_TokenLogProbs` slice, in elements (64 MiB): the memory budget of a log-prob."""


class _TokenLogProbs(torch.autograd.Function):
    """``log_softmax(z_t / T)[y_t]`` and the entropy of ``softmax(z_t / T)`` (bits), slice by slice, bit for bit what
    ``F.log_softmax(logits.float() / T).gather(...)`` and its autograd give.

    That expression keeps an fp32 ``[N, L, V]`` copy alive for the backward (with a 150k vocabulary the largest
    tensor of a step); so would ``logits / T``. Here each slice of rows is upcast, scaled, reduced and dropped; the
    backward recomputes the slice's ``log_softmax`` from the saved logits (in their own dtype):
    ``d log p(y_t) / d z_t = (onehot(y_t) - p_t) / T``. The entropy is differentiable too (an entropy bonus needs it):
    ``d H_nats / d z_t = -p_t (log p_t + H_nats) / T``, in bits divided by ``ln 2``. ``T = 1`` divides nothing.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int, temperature: float):
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        log_probs = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(log_probs)
        for start in range(0, flat.shape[0], rows):
            part = slice(start, start + rows)
            logp = _scaled_log_softmax(flat[part], temperature)
            log_probs[part] = logp.gather(-1, flat_targets[part]).squeeze(-1)
            entropy[part] = entropy_bits_of_log_probs(logp)
        ctx.save_for_backward(logits, targets)
        ctx.rows, ctx.temperature = rows, temperature
        ctx.set_materialize_grads(False)  # an output nobody backpropagates through comes back as None
        return log_probs.view(targets.shape), entropy.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, targets = ctx.saved_tensors
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        grad = grad_log_probs.reshape(-1, 1).float() if grad_log_probs is not None else None
        grad_h = grad_entropy.reshape(-1, 1).float() if grad_entropy is not None else None
        grad_logits = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            logp = _scaled_log_softmax(flat[part], ctx.temperature)
            # log_softmax's own backward, ``g_onehot - exp(logp) * sum(g_onehot)``, on a zero-but-one gradient
            onehot = torch.zeros(flat[part].shape, dtype=torch.float32, device=flat.device)
            if grad is not None:
                onehot.scatter_(-1, flat_targets[part], grad[part])
            g = torch._log_softmax_backward_data(onehot, logp, -1, torch.float32)
            if grad_h is not None and bool(grad_h[part].any()):
                p = logp.exp()
                h_nats = -(p * logp).sum(-1, keepdim=True)
                g = g - grad_h[part] * p * (logp + h_nats) / math.log(2.0)
            grad_logits[part] = g if ctx.temperature == 1.0 else g / ctx.temperature
        return grad_logits.view_as(logits), None, None, None


def _scaled_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(z / T)`` of a slice, in fp32 (``T = 1`` divides nothing)."""
    z = logits.float()
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def token_log_probs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(targets[t] | logits[t] / T) [N, L] fp32, entropy bits [N, L] fp32)`` from one pass over the
    logits, never holding more than a :data:`LOG_PROB_SLICE_ELEMENTS` fp32 slice of them (any logits dtype).

    ``temperature``: the distribution ``softmax(z / T)`` (the sampling policy's; TRL's convention).
    ``entropy_grad``: the entropy keeps its graph (an entropy bonus backpropagates through it); by default it is
    a diagnostic without ``grad_fn``, so keeping it never keeps the graph."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must be logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"the log-prob temperature must be > 0, got {temperature!r}")
    rows = max(1, LOG_PROB_SLICE_ELEMENTS // logits.shape[-1])
    log_probs, entropy = _TokenLogProbs.apply(logits, targets, rows, float(temperature))
    return log_probs, entropy if entropy_grad else entropy.detach()


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets[t] | logits[t])`` per position, in fp32: ``[N, L, V], [N, L] -> [N, L]``, without an fp32
    ``[N, L, V]`` copy (:func:`token_log_probs_and_entropy`)."""
    return token_log_probs_and_entropy(logits, targets)[0]


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: ``exp(d) - d - 1`` with ``d = ref - logp``.

    Unbiased for the KL under samples from ``pi``, always >= 0, and low variance; the estimator TRL and
    DeepSeekMath use.
    """
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 when the mask is empty (never NaN)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate_token_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType,
    max_completion_length: int,
    num_tokens: torch.Tensor | float | None = None,
    num_sequences: int | None = None,
    local_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[N, L]`` to a scalar.

    - ``grpo``: mean over each sequence's tokens, then mean over sequences (long answers weigh less per
      token: the length bias Dr. GRPO points out).
    - ``dr_grpo``: sum over all tokens / (N * max_completion_length): a constant normaliser, no length bias.
    - ``dapo``: sum over all tokens / number of tokens (token-level mean across the batch).
    - ``bnpo``: the token mean of this process's batch alone (TRL's ``bnpo``). On one process it is ``dapo``;
      under DDP the ranks' means are averaged, so a rank with fewer tokens weighs each of them more.

    ``num_tokens`` replaces the ``dapo`` denominator; under DDP pass the global token count / world size, so
    that DDP's average of the ranks' gradients is the single-process token mean (what TRL does). ``bnpo``
    ignores it.

    Micro-batches: ``per_token`` may be a chunk of rows of a larger batch. The chunk losses then sum to the whole
    batch's loss when every normaliser is the whole batch's: ``num_sequences`` (``grpo``, ``dr_grpo``: its rows),
    ``num_tokens`` (``dapo``: its token count, averaged over ranks) and ``local_tokens`` (``bnpo``: this rank's
    token count). Each defaults to the chunk's own, i.e. the chunk is the batch.
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    rows = per_token.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / rows
    if loss_type == "dr_grpo":
        return masked.sum() / (rows * max_completion_length)
    if loss_type == "dapo":
        return masked.sum() / (mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens)
    if loss_type == "bnpo":
        return masked.sum() / (mask.sum().clamp(min=1.0) if local_tokens is None else local_tokens)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def entropy_bonus(
    entropy_nats: torch.Tensor,
    mask: torch.Tensor,
    train_mask: torch.Tensor | None = None,
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """TRL's entropy bonus term ``H = sum_t H_t m_t / sum_t m_t`` over the loss tokens ``m`` (the top-entropy ones
    when ``train_mask`` selects), in nats; the loss is ``L - entropy_coef * H`` (TRL's ``entropy_coef``), so a
    positive coefficient pushes the policy's entropy up. ``num_tokens``: the whole batch's ``sum m`` when these rows
    are a micro-batch of it (the chunks' terms then sum to the batch's); None = these rows' own count."""
    kept = mask.bool() if train_mask is None else mask.bool() & train_mask.bool()
    weights = kept.to(entropy_nats.dtype)
    count = weights.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    return (entropy_nats * weights).sum() / count


@dataclass
class PolicyLossOutput:
    """The scalar loss and the statistics TRL logs for it (all detached except ``loss``)."""

    loss: torch.Tensor
    kl: torch.Tensor
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    cov_selected: torch.Tensor | None = None
    """Clip-Cov / KL-Cov: the fraction of loss tokens the covariance selected (None for ``clip``)."""


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """The tokens among ``mask`` whose entropy is in the top ``top_quantile`` fraction (TRL's
    ``top_entropy_quantile``, after "Beyond the 80/20 rule", arXiv 2506.01939: train on the forking tokens).

    ``threshold = quantile(entropy[mask], 1 - top_quantile)`` (linear interpolation, as ``numpy.quantile``;
    computed by sorting, so a batch of any size works);
    keep ``entropy >= threshold``. ``top_quantile = 1`` keeps every token of ``mask``. ``entropy`` and
    ``mask`` may carry a leading rank dimension (all ranks' tokens gathered): the threshold is then global.
    Masked-out entries may hold anything, NaN included.
    """
    if not 0.0 < top_quantile <= 1.0:
        raise ValueError(f"top_quantile must be in (0, 1], got {top_quantile!r}")
    mask = mask.bool()
    if top_quantile == 1.0 or not mask.any():
        return mask
    values = entropy[mask].float().sort().values  # torch.quantile refuses inputs over 2**24 elements
    position = (1.0 - top_quantile) * (values.numel() - 1)
    below = int(position)
    above = min(below + 1, values.numel() - 1)
    threshold = values[below] + (position - below) * (values[above] - values[below])
    return mask & (entropy.float() >= threshold)


@dataclass(frozen=True)
class LossOptions:
    """The surrogate's settings (from ``rl.*``: :meth:`corrpo.training.config.RLConfig.loss_options`)."""

    epsilon_low: float = 0.2
    """Lower clip: ``ratio >= 1 - epsilon_low``."""
    epsilon_high: float = 0.2
    """Upper clip: ``ratio <= 1 + epsilon_high`` (DAPO's clip-higher when larger than ``epsilon_low``)."""
    loss_type: LossType = "dapo"
    """The aggregation (:func:`aggregate_token_loss`)."""
    max_completion_length: int | None = None
    """``dr_grpo``'s constant normaliser; None = the mask's width."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference (needs ``ref_log_probs`` when > 0)."""
    policy_loss: str = "clip"
    """``clip``, ``clip_cov`` or ``kl_cov`` (:mod:`corrpo.training.covariance_tokens`)."""
    cov_ratio: float = 2e-4
    """Clip-Cov / KL-Cov: the fraction of tokens restrained."""
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0)
    """Clip-Cov: the covariance window a restrained token's covariance must fall in."""
    kl_cov_coef: float = 1.0
    """KL-Cov: the weight of ``|logp - logp_old|`` on the restrained tokens."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """``token``: one ratio per token (GRPO / PPO). ``sequence``: GSPO (Zheng et al. 2025, arXiv 2507.18071; TRL's
    ``importance_sampling_level: sequence``, verl's ``loss_mode: gspo``): one ratio per response,
    ``s_i = exp(mean_t (logp_t - logp_old_t))`` over its loss tokens, clipped and applied to every token of it."""
    delta: float | None = None
    """Two-sided clip (TRL's ``delta``, INTELLECT-2): the unclipped ratio of the surrogate is capped at ``delta`` too,
    so a negative-advantage token's ratio cannot grow without bound; None = off (TRL recommends
    ``delta > 1 + epsilon_high``)."""
    use_bias_correction_kl: bool = False
    """Multiply the per-token k3 KL by the importance ratio (with its gradient), TRL's ``use_bias_correction_kl``
    (DeepSeek-V3.2): the KL gradient becomes the unbiased reverse-KL gradient ``E[(k3 + 1 - r_ref) grad logp]``
    instead of k3's own ``(1 - r_ref) grad logp``. False keeps the plain k3 penalty."""


@dataclass(frozen=True)
class LossNormalisers:
    """The whole batch's normalisers when the loss is computed on a micro-batch of it (see
    :func:`aggregate_token_loss`); each None = the chunk's own (the chunk is the batch)."""

    num_tokens: torch.Tensor | float | None = None
    num_sequences: int | None = None
    local_tokens: torch.Tensor | float | None = None


@dataclass(frozen=True)
class TokenSelection:
    """Tokens chosen over a whole batch before the loss is split into micro-batches (each None = off)."""

    train_mask: torch.Tensor | None = None
    """``[N, L]`` the tokens the policy term trains on (e.g. :func:`high_entropy_mask`); the others' loss is 0."""
    cov_tokens: torch.Tensor | None = None
    """``[N, L]`` Clip-Cov / KL-Cov's restrained tokens (:func:`covariance_selection`); None = select here."""


def covariance_selection(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions,
) -> torch.Tensor:
    """Clip-Cov / KL-Cov's restrained tokens ``[N, L]`` bool over a whole batch (detached): the covariance means,
    the token count and Clip-Cov's random draw all span the batch, so a micro-batched step selects what the
    full-batch step would and applies the selection chunk by chunk."""
    with torch.no_grad():
        cov = token_covariance(advantages, log_probs, mask)
        if options.policy_loss == "clip_cov":
            adv = advantages.unsqueeze(-1).to(log_probs.dtype)
            ratio = torch.exp(log_probs - old_log_probs)
            clipped = torch.clamp(ratio, 1.0 - options.epsilon_low, 1.0 + options.epsilon_high)
            stopped = clipped * adv < ratio * adv  # the clip is the active term there already
            return clip_cov_tokens(cov, mask, stopped, options.cov_ratio, *options.clip_cov_bounds)
        if options.policy_loss == "kl_cov":
            return kl_cov_tokens(cov, mask, options.cov_ratio)
    raise ValueError(f"covariance_selection: policy_loss must be clip_cov or kl_cov, got {options.policy_loss!r}")


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: LossOptions = LossOptions(),
    ref_log_probs: torch.Tensor | None = None,
    selection: TokenSelection = TokenSelection(),
    normalisers: LossNormalisers = LossNormalisers(),
) -> PolicyLossOutput:
    """The clipped surrogate, per token, aggregated.

    ``ratio = exp(logp - logp_old)``; per token
    ``loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3``.
    ``A`` is the sequence's advantage broadcast over its tokens. With one update per rollout batch
    ``logp_old = logp.detach()`` and the ratio is 1, so the gradient is the plain policy gradient.

    Clip statistics follow TRL: a token is low-clipped when ``ratio < 1 - eps_low`` and ``A < 0`` (the
    clip is what stops the gradient), high-clipped when ``ratio > 1 + eps_high`` and ``A > 0``.
    ``options.importance_sampling_level: sequence`` (GSPO) replaces each token's ratio by its response's
    ``exp(mean_t log ratio_t)``; ``options.delta`` caps the unclipped ratio at ``delta`` (TRL's two-sided clip).
    ``normalisers``: see :func:`aggregate_token_loss`. ``selection.train_mask`` (e.g. :func:`high_entropy_mask`)
    zeroes the policy term of the other tokens while the normaliser still counts every token of ``mask``, as TRL
    does: a smaller kept set means a smaller step, not a rescaled one; the KL term (``beta > 0``) is added after
    the mask, on every token of ``mask``, as TRL adds it. ``options.use_bias_correction_kl``: the k3 term times the
    ratio (TRL's bias-corrected KL); the logged ``kl`` is then that product's mean, as TRL logs it.

    ``options.policy_loss``: ``clip`` (the above), ``clip_cov`` (the above with the gradient of a few
    high-covariance tokens removed) or ``kl_cov`` (unclipped ``-ratio * A``, plus ``kl_cov_coef * |logp -
    logp_old|`` on the highest-covariance tokens); see :mod:`corrpo.training.covariance_tokens` for the selection
    and its parameters. ``selection.cov_tokens``: that selection made already (:func:`covariance_selection`, over a
    whole batch of which these rows are a micro-batch).
    """
    o = options
    if o.beta > 0 and ref_log_probs is None:
        raise ValueError("beta > 0 needs ref_log_probs")
    adv = advantages.unsqueeze(-1).to(log_probs.dtype)
    log_ratio = log_probs - old_log_probs
    if o.importance_sampling_level == "sequence":  # GSPO: the length-normalised sequence ratio, on every token
        weights = mask.to(log_ratio.dtype)
        log_ratio = (log_ratio * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = log_ratio.expand_as(log_probs)
    elif o.importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {o.importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - o.epsilon_low, 1.0 + o.epsilon_high)
    capped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)  # TRL caps after taking the clip
    per_token = -torch.minimum(capped * adv, clipped * adv)
    cov_selected = None
    if o.policy_loss != "clip":
        if o.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {POLICY_LOSSES}, got {o.policy_loss!r}")
        chosen = selection.cov_tokens
        if chosen is None:
            chosen = covariance_selection(log_probs, old_log_probs, advantages, mask, o)
        if o.policy_loss == "clip_cov":
            per_token = per_token * (~chosen).to(per_token.dtype)
        else:
            penalty = o.kl_cov_coef * (log_probs - old_log_probs).abs() * chosen.to(log_probs.dtype)
            per_token = -ratio * adv + penalty
        cov_selected = masked_mean(chosen.float(), mask)
    if selection.train_mask is not None:  # the policy term only: the KL below stays on every token, as in TRL
        per_token = per_token * selection.train_mask.to(per_token.dtype)
    kl = torch.zeros((), device=log_probs.device)
    if ref_log_probs is not None:
        kl_tok = kl_k3(log_probs, ref_log_probs)
        if o.use_bias_correction_kl:
            kl_tok = kl_tok * ratio
        kl = masked_mean(kl_tok.detach(), mask)
        if o.beta > 0:
            per_token = per_token + o.beta * kl_tok
    length = o.max_completion_length if o.max_completion_length is not None else mask.shape[-1]
    n = normalisers
    loss = aggregate_token_loss(per_token, mask, o.loss_type, length, n.num_tokens, n.num_sequences, n.local_tokens)
    with torch.no_grad():
        low = (capped < 1.0 - o.epsilon_low) & (adv < 0)
        high = (capped > 1.0 + o.epsilon_high) & (adv > 0)
        clip_low = masked_mean(low.float(), mask)
        clip_high = masked_mean(high.float(), mask)
    return PolicyLossOutput(loss=loss, kl=kl, clip_low=clip_low, clip_high=clip_high, cov_selected=cov_selected)
