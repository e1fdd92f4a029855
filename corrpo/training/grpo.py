"""One GRPO-family RL step as plain code: rollout -> rewards -> CorR-PO term -> group advantages -> updates.

This is the whole RL step, outside Lightning, so that the module (:class:`corrpo.module.CorrPOModule`), the
benchmark (``benchmarks/rl_step.py``) and unit tests run exactly the same code:

1. **rollout**: ``G`` sampled completions per prompt from the context's generator;
2. **rewards**: every reward function (:func:`corrpo.rewards.combine.score_completions`), then the CorR-PO term
   ``lambda * clip(-rho_i, -1, 1)`` as one more reward stage (:mod:`corrpo.training.corrpo_term`, its one home)
   that returns its own values; ``lambda = 0`` computes nothing and is plain GRPO bit for bit; with
   ``rl.dynamic_sampling`` the groups whose task rewards are all equal are dropped first and more prompts sampled
   until the batch is full (:mod:`corrpo.training.dynamic_sampling`, DAPO);
3. **advantages**: group-normalised (:func:`corrpo.training.objectives.group_advantages`);
4. **updates**: ``num_iterations`` steps of the clipped surrogate (+ optional k3 KL to a frozen reference), each
   through :func:`corrpo.training.update.apply_update` (non-finite guard, clip, lr schedule).

It returns an :class:`RLStepResult`: every number the module logs (TRL's metric names), the per-stage timings
and one row per completion for the dashboard. The math itself lives in :mod:`corrpo.training.objectives` and
:mod:`corrpo.inversion`; this file only orders it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from corrpo.generation.rollout import Rollout
from corrpo.rewards.call import Prompt, RewardFn, RewardInputs, RewardLog, StepInfo, group_inputs
from corrpo.rewards.combine import (
    RewardFailureMonitor,
    RewardScores,
    checked_reward_weights,
    completion_rows,
    score_completions,
)
from corrpo.training.collectives import SINGLE_PROCESS, Collectives
from corrpo.training.config import RLConfig
from corrpo.training.corrpo_term import (
    CorrPOTerm,
    corrpo_term,
    corrpo_term_on_update_forward,
    enter_term,
    shares_update_forward,
)
from corrpo.training.dynamic_sampling import FilledBatch, fill_with_varied_groups
from corrpo.training.forward import completion_log_probs, row_chunks
from corrpo.training.group_filter import resolve_metric
from corrpo.training.objectives import (
    LossNormalisers,
    PolicyLossOutput,
    TokenSelection,
    clipped_policy_loss,
    covariance_selection,
    entropy_bonus,
    high_entropy_mask,
    masked_mean,
    zero_std_fraction,
)
from corrpo.training.reference_sync import mix_reference, sync_due
from corrpo.training.sampled_groups import SampledGroups
from corrpo.training.schedule import warmup_cosine_lr
from corrpo.training.update import UpdateOutcome, apply_update, require_finite_parameters


@dataclass
class RLContext:
    """What an RL step acts on: the policy, its optimizer, how to sample and decode, and the ranks."""

    policy: nn.Module
    optimizer: torch.optim.Optimizer
    generate: Callable[[list[str], int], Rollout]
    """``generate(prompts, G)``: ``G`` sampled completions per prompt, prompt-major."""
    decode: Callable[[Rollout], list[str]]
    """Completion texts of a rollout (special tokens dropped)."""
    ref_policy: nn.Module | None = None
    """Frozen KL reference (``rl.beta > 0``)."""
    collectives: Collectives = SINGLE_PROCESS
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    """Lightning's ``manual_backward`` inside a Trainer."""
    more_prompts: Callable[[], dict] | None = None
    """``rl.dynamic_sampling``'s next round of prompts: ``prompt``, ``answer``, ``columns`` (the data module's)."""
    pad_token_id: int = 0
    """Fills the (masked) padding where dynamic sampling joins rounds of different token widths."""


@dataclass
class RLStepResult:
    """Everything one RL step produced, for logging."""

    metrics: dict[str, torch.Tensor | float]
    """Scalars under TRL's names (``reward``, ``reward_std``, ``kl``, ``clip_ratio/*``, ``rewards/<f>/mean``, ...)."""
    updates: list[UpdateOutcome]
    """One per ``num_iterations`` update, applied or skipped."""
    completions: list[dict]
    """One row per completion: prompt, completion, each reward part, reward, advantage, rho."""
    rewards: torch.Tensor
    """``[N]`` total reward (task rewards + CorR-PO term)."""
    advantages: torch.Tensor
    """``[N]`` group advantages."""
    scores: RewardScores
    """Per-function scores, the CorR-PO term included as ``inversion``."""
    inversion: CorrPOTerm | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: ``generate``, ``score``, ``inversion`` (when on), ``update``."""


class GRPOStep:
    """The RL step of a run: built once from ``rl`` and the reward functions, called once per rollout batch."""

    def __init__(self, rl: RLConfig, reward_fns: dict[str, RewardFn], weights: Sequence[float] | None = None) -> None:
        """``weights``: one per reward function (default ``rl.reward_weights``, which defaults to 1 each)."""
        self.rl = rl
        self.reward_fns = reward_fns
        self.reward_weights = checked_reward_weights(rl.reward_weights if weights is None else weights, len(reward_fns))
        # stops a run whose reward fails on most samples for rl.reward_failure_patience steps in a row
        self.reward_monitor = RewardFailureMonitor(rl.max_reward_failure_share, rl.reward_failure_patience)
        dynamic = rl.dynamic_sampling
        self.filter_metric = resolve_metric(dynamic.metric, reward_fns) if dynamic.enable else None

    # ---------------------------------------------------------------------------------------- stages
    def score(self, inputs: RewardInputs, monitor: bool = True) -> RewardScores:
        """Task rewards of the ``N = B * G`` completions; ``monitor``: the failure monitor counts the call as a step."""
        monitor_ = self.reward_monitor if monitor else None
        return score_completions(self.reward_fns, self.reward_weights, inputs, monitor_, self.rl.reward_timeout_s)

    def sample(
        self, ctx: RLContext, prompts: list[Prompt], answers: list[str], columns: dict[str, list] | None,
        info: StepInfo, timings: dict[str, float], monitor: bool = True,
    ) -> SampledGroups:  # fmt: skip
        """Stages 1 and 2 on ``B`` prompts: ``G`` completions each, scored (seconds added to ``timings``)."""
        G = self.rl.num_generations
        t0 = time.perf_counter()
        rollout = ctx.generate(prompts, G)
        t1 = time.perf_counter()
        completions = ctx.decode(rollout)
        inputs = group_inputs(  # as the start-up dry run builds them (corrpo.rewards.dry_run)
            prompts, answers, columns, completions, G, completion_ids=completion_token_ids(rollout),
            trainer_state=info, log=RewardLog(),
        )  # fmt: skip
        scores = self.score(inputs, monitor)
        timings["generate"] = timings.get("generate", 0.0) + t1 - t0
        timings["score"] = timings.get("score", 0.0) + time.perf_counter() - t1
        return SampledGroups(rollout, inputs, scores, G)

    def fill(self, ctx: RLContext, first: SampledGroups, info: StepInfo, timings: dict[str, float]) -> FilledBatch:
        """``rl.dynamic_sampling``: ``first``'s size in varied groups, sampling rounds of ``ctx.more_prompts()``
        (:func:`corrpo.training.dynamic_sampling.fill_with_varied_groups`); the failure monitor counts it once."""

        def sample_more() -> SampledGroups:
            more = ctx.more_prompts()
            return self.sample(ctx, more["prompt"], more["answer"], more.get("columns"), info, timings, False)

        rl, more = self.rl, sample_more if ctx.more_prompts is not None else None
        skip = rl.unscorable_rewards == "skip"
        filled = fill_with_varied_groups(
            first, more, rl.dynamic_sampling, self.filter_metric, skip, ctx.collectives, ctx.pad_token_id
        )
        self.reward_monitor.update(filled.batch.scores, filled.scored_samples)
        return filled

    def lr_at(self, update_index: int) -> float:
        """RL learning rate at 0-based RL optimizer step ``update_index`` (warm-up + cosine over all updates)."""
        rl = self.rl
        return warmup_cosine_lr(rl.lr, update_index, rl.steps * rl.num_iterations, rl.warmup_steps, rl.min_lr_ratio)

    def train_mask(
        self, token_entropy: torch.Tensor | None, loss_mask: torch.Tensor, collectives: Collectives
    ) -> torch.Tensor | None:
        """``rl.top_entropy_quantile < 1``: the loss tokens in the top fraction by entropy, the threshold taken over
        every rank's tokens (:func:`corrpo.training.objectives.high_entropy_mask`); else None (train on all)."""
        quantile = self.rl.top_entropy_quantile
        if quantile >= 1.0:
            return None
        if collectives.world_size == 1:
            return high_entropy_mask(token_entropy, loss_mask, quantile)
        # ranks' completions differ in width: pad to max_new_tokens so all_gather sees one shape
        pad = (0, self.rl.sampling.max_new_tokens - token_entropy.shape[1])
        every_entropy = collectives.all_gather(F.pad(token_entropy, pad))
        every_mask = collectives.all_gather(F.pad(loss_mask.float(), pad))
        keep = high_entropy_mask(every_entropy, every_mask, quantile)[collectives.rank]
        return keep[:, : token_entropy.shape[1]]

    # ------------------------------------------------------------------------------------------ step
    def __call__(
        self,
        ctx: RLContext,
        prompts: list[Prompt],
        answers: list[str],
        rl_index: int,
        step: int | None = None,
        columns: dict[str, list] | None = None,
        max_steps: int = 0,
    ) -> RLStepResult:
        """One RL step on a batch of ``B`` prompts with their gold ``answers``.

        Args:
            ctx: policy, optimizer, sampling and the ranks.
            prompts: ``B`` prompts, text or message lists; each gets ``rl.num_generations`` completions (handed to
                the rewards as text, or as assistant message lists when the prompt is a message list, as TRL does).
            answers: their gold answers (passed to the reward functions as ``answer``).
            rl_index: 0-based RL step (drives the lr schedule and the CorR-PO warm-up).
            step: the run's batch index, written in the completion rows (default ``rl_index``).
            columns: the batch's other dataset columns, one value per prompt, passed to the rewards by name
                (repeated per group member, as TRL does).
            max_steps: train batches of the whole run (the rewards' ``trainer_state.max_steps``).
        """
        rl, G = self.rl, self.rl.num_generations
        require_finite_parameters(ctx.policy, ctx.collectives, f"as RL step {rl_index} starts,")  # not eigh's error
        timings: dict[str, float] = {}
        info = StepInfo(rl_index if step is None else step, max_steps, rl_index)
        dynamic = rl.dynamic_sampling.enable
        batch = self.sample(ctx, prompts, answers, columns, info, timings, monitor=not dynamic)
        filled = self.fill(ctx, batch, info, timings) if dynamic else None
        batch = filled.batch if filled is not None else batch
        rollout, inputs, scores = batch.rollout, batch.inputs, batch.scores
        device = rollout.sequences.device

        term = first_forward = None
        if rl.inversion.scored:
            t0 = time.perf_counter()
            n_chunks = len(row_chunks(rollout.sequences.shape[0], rl.micro_batch_size))
            # the shared forward hands the update a detached entropy: an entropy bonus needs its own forward
            if shares_update_forward(ctx.policy, rl.inversion, n_chunks) is None and rl.entropy_coef == 0:
                term, first_forward = corrpo_term_on_update_forward(
                    ctx.policy, rollout, rl.inversion, rl_index, G, rl.packing, rl.sampling.temperature
                )
            else:
                rows = rl.inversion.rows_per_chunk or rl.micro_batch_size or 64
                term = corrpo_term(ctx.policy, rollout, rl.inversion, rl_index, G, rows)
            timings["inversion"] = time.perf_counter() - t0
        scores, rewards, advantages = enter_term(
            term, rl.inversion, scores, G, rl.scale_rewards, device, rl.unscorable_rewards == "skip"
        )
        rows = completion_rows(
            rl_index if step is None else step, inputs, scores, rewards, advantages,
            term.rho if term is not None else None,
        )  # fmt: skip

        t0 = time.perf_counter()
        out, entropy, updates = self.update(ctx, rollout, advantages, rl_index, first_forward)
        timings["update"] = time.perf_counter() - t0

        metrics = self._step_metrics(ctx, rollout, rewards, scores, out, entropy, term)
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics.update(inputs.log.metrics)  # a reward's log_metric(name, value), under its own name as in TRL
        metrics.update(filled.metrics() if filled is not None else {})
        return RLStepResult(
            metrics=metrics, updates=updates, completions=rows, rewards=rewards, advantages=advantages,
            scores=scores, inversion=term, timings=timings,
        )  # fmt: skip

    def update(
        self,
        ctx: RLContext,
        rollout: Rollout,
        advantages: torch.Tensor,
        rl_index: int,
        first_forward: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[PolicyLossOutput, torch.Tensor, list[UpdateOutcome]]:
        """``num_iterations`` updates, each over the batch in micro-batches of ``rl.micro_batch_size`` rows.

        Every normaliser and every selection spans the WHOLE batch (all ranks where the loss says so), so the
        micro-batched update is the full-batch one: the token counts and row count are taken before the chunks;
        the top-entropy threshold and the Clip-Cov / KL-Cov tokens come from the chunk's own forward when there
        is one chunk, else from a no-grad pass over all chunks first (same weights, so the same values).
        ``first_forward``: the one chunk's ``(log_probs, entropy)`` already computed, graph kept, by the shared
        CorR-PO scoring (:func:`corrpo.training.corrpo_term.corrpo_term_on_update_forward`); the first update
        backpropagates through it.
        """
        rl = self.rl
        loss_mask = rollout.completion_mask
        if rl.mask_truncated_completions:
            loss_mask = loss_mask & ~rollout.truncated.unsqueeze(1)
        chunks = row_chunks(loss_mask.shape[0], rl.micro_batch_size)
        temperature = rl.sampling.temperature  # every log-prob on logits / T: the sampling policy's, as TRL and verl
        old_log_probs = ref_log_probs = None
        with torch.no_grad():
            if rl.num_iterations > 1:
                old_log_probs = _whole_batch(ctx.policy, rollout, chunks, rl.packing, temperature)[0]
            if ctx.ref_policy is not None:
                ref_log_probs = _whole_batch(ctx.ref_policy, rollout, chunks, rl.packing, temperature)[0]
        local_tokens = loss_mask.sum().float().clamp(min=1.0)
        normalisers = LossNormalisers(
            num_tokens=ctx.collectives.mean(local_tokens) if rl.loss_type == "dapo" else None,
            num_sequences=loss_mask.shape[0],
            local_tokens=local_tokens,
        )
        options = rl.loss_options()
        entropy_grad = rl.entropy_coef != 0  # TRL's entropy bonus backpropagates through the token entropies
        needs_whole_batch = rl.top_entropy_quantile < 1.0 or rl.policy_loss != "clip"
        updates, entropy = [], None
        for iteration in range(rl.num_iterations):
            selection = None
            if needs_whole_batch and len(chunks) > 1:
                with torch.no_grad():
                    scores = _whole_batch(ctx.policy, rollout, chunks, rl.packing, temperature)
                    selection = self._selection(ctx, *scores, old_log_probs, advantages, loss_mask)
            stats = _LossStats()

            given = first_forward if iteration == 0 else None
            if given is not None and len(chunks) != 1:
                raise ValueError("a shared first forward needs the update in one micro-batch")

            def losses(selection=selection, stats=stats, given=given):
                for rows in chunks:
                    log_probs, token_entropy = given or completion_log_probs(
                        ctx.policy, rollout, rows, rl.packing, temperature, entropy_grad
                    )
                    if selection is None:  # one chunk: the batch itself
                        selection = self._selection(ctx, log_probs.detach(), token_entropy.detach(), old_log_probs,
                                                    advantages, loss_mask)  # fmt: skip
                    train_mask, cov_tokens = (None if s is None else s[rows] for s in selection)
                    out = clipped_policy_loss(
                        log_probs,
                        old_log_probs[rows] if old_log_probs is not None else log_probs.detach(),
                        advantages[rows],
                        loss_mask[rows],
                        options,
                        ref_log_probs[rows] if ref_log_probs is not None else None,
                        TokenSelection(train_mask, cov_tokens),
                        normalisers,
                    )
                    loss = out.loss
                    if entropy_grad:  # L - entropy_coef * H, H in nats over the (top-entropy) loss tokens, as TRL
                        kept = loss_mask if selection[0] is None else loss_mask & selection[0]
                        whole = kept.sum().float().clamp(min=1.0) if len(chunks) > 1 else None
                        bonus = entropy_bonus(token_entropy * math.log(2.0), loss_mask[rows], train_mask, whole)
                        loss = loss - rl.entropy_coef * bonus
                    stats.add(out, loss_mask[rows], token_entropy.detach(), rollout.completion_mask[rows])
                    stats.cov_tokens = selection[1]
                    yield loss

            update_index = rl_index * rl.num_iterations + iteration
            lr = self.lr_at(update_index)
            update = apply_update(losses(), ctx.optimizer, ctx.policy, lr, rl.max_grad_norm, ctx.collectives,
                                  ctx.backward)  # fmt: skip
            updates.append(update)
            if rl.sync_ref_model and ctx.ref_policy is not None and sync_due(update_index + 1, rl.ref_model_sync_steps):
                mix_reference(ctx.policy, ctx.ref_policy, rl.ref_model_mixup_alpha)  # TRL's on_step_end
            out = stats.output(update.loss, loss_mask)
            if iteration == 0:
                entropy = stats.entropy()
        return out, entropy, updates

    def _selection(
        self, ctx: RLContext, log_probs: torch.Tensor, token_entropy: torch.Tensor,
        old_log_probs: torch.Tensor | None, advantages: torch.Tensor, loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """The whole batch's ``(train_mask, cov_tokens)``: the top-entropy tokens and Clip-Cov / KL-Cov's
        restrained tokens (each None when off), from detached whole-batch log-probs and entropies."""
        rl = self.rl
        cov_tokens = None
        if rl.policy_loss != "clip":
            old = old_log_probs if old_log_probs is not None else log_probs
            cov_tokens = covariance_selection(log_probs, old, advantages, loss_mask, rl.loss_options())
        return self.train_mask(token_entropy, loss_mask, ctx.collectives), cov_tokens

    def _step_metrics(self, ctx, rollout, rewards, scores, out, entropy, term) -> dict[str, torch.Tensor | float]:
        G = self.rl.num_generations
        metrics: dict[str, torch.Tensor | float] = {}
        if term is not None:
            key = "spearman" if self.rl.inversion.correlation == "spearman" else "pearson"
            metrics[f"inversion/rollout_{key}"] = pooled_mean(term.rho[term.valid], ctx.collectives, rewards.device)
            metrics["inversion/rollout_nan_frac"] = 1.0 - term.valid.float().mean()
            if "inversion" in scores.per_function:  # apply: reward (its mean is logged with the other rewards')
                metrics["rewards/inversion/std"] = term.bonus.float().std() if term.bonus.numel() > 1 else 0.0
        lengths = rollout.completion_mask.sum(dim=1).float()
        scored = rewards[~rewards.isnan()]  # unscorable samples (rl.unscorable_rewards: skip) are left out, as in TRL
        metrics.update(
            {
                "loss": out.loss.detach(),
                "reward": scored.mean() if scored.numel() else torch.tensor(float("nan")),
                "reward_std": scored.std() if scored.numel() > 1 else torch.zeros(()),
                "frac_reward_zero_std": zero_std_fraction(rewards, G),
                # TRL's entropy: nats of the sampling distribution softmax(z / T), over the completion tokens; the
                # same in bits (the inversion's unit, on the logits the update reads) under inversion/
                "entropy": entropy * math.log(2.0),
                "inversion/policy_entropy_bits": entropy,
                "kl": out.kl,
                "clip_ratio/low_mean": out.clip_low,
                "clip_ratio/high_mean": out.clip_high,
                **({"clip_ratio/cov_selected": out.cov_selected} if out.cov_selected is not None else {}),
                "completions/mean_length": lengths.mean(),
                "completions/clipped_ratio": rollout.truncated.float().mean(),
            }
        )
        for name, values in scores.per_function.items():
            metrics[f"rewards/{name}/mean"] = torch.nanmean(values)  # NaN, not a fake 0, when nothing was scored
            if name in self.reward_fns:  # logged even when 0: under DDP every rank logs the same keys
                metrics[f"rewards/{name}/failed"] = float(scores.n_failed.get(name, 0))
                metrics[f"rewards/{name}/unscored"] = float(scores.n_unscored.get(name, 0))
        return metrics


def completion_token_ids(rollout: Rollout) -> list[list[int]]:
    """Each completion's token ids without padding (TRL's ``completion_ids`` reward keyword)."""
    ids, mask = rollout.completion_ids.detach().cpu(), rollout.completion_mask.detach().cpu()
    return [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]


def pooled_mean(values: torch.Tensor, collectives: Collectives, device: torch.device | str = "cpu") -> torch.Tensor:
    """The mean over every rank's ``values`` (under DDP: not the mean of the ranks' means, which would weigh a rank
    with few values like one with many, and be NaN if any rank had none); NaN when there are none."""
    total, count = collectives.sum_floats(values.double().sum().item(), values.numel(), device=device)
    return torch.tensor(total / count if count else float("nan"), dtype=torch.float32)


def _whole_batch(
    model: nn.Module, rollout: Rollout, chunks: list[slice], packed: bool = False, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probs and entropies ``[N, L]`` of the whole batch on ``logits / temperature``, computed chunk by
    chunk (call without grad)."""
    parts = [completion_log_probs(model, rollout, rows, packed, temperature) for rows in chunks]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class _LossStats:
    """The whole batch's loss statistics from its micro-batches: each chunk's masked means weighted by its token
    count (what the full-batch masked mean is), and the entropy over the completion tokens."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0.0
        self.entropy_sum = self.entropy_count = 0.0
        self.cov_tokens: torch.Tensor | None = None

    def add(self, out: PolicyLossOutput, loss_mask: torch.Tensor, token_entropy: torch.Tensor, mask: torch.Tensor):
        n = loss_mask.sum().float()
        for key in ("kl", "clip_low", "clip_high"):
            value = getattr(out, key).detach() * n
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.tokens = self.tokens + n
        self.entropy_sum = self.entropy_sum + (token_entropy * mask).sum()
        self.entropy_count = self.entropy_count + mask.sum().float()

    def output(self, loss: torch.Tensor, loss_mask: torch.Tensor) -> PolicyLossOutput:
        tokens = self.tokens.clamp(min=1.0) if isinstance(self.tokens, torch.Tensor) else 1.0
        means = {key: value / tokens for key, value in self.sums.items()}
        cov = masked_mean(self.cov_tokens.float(), loss_mask) if self.cov_tokens is not None else None
        return PolicyLossOutput(loss=loss, cov_selected=cov, **means)

    def entropy(self) -> torch.Tensor:
        count = self.entropy_count.clamp(min=1.0) if isinstance(self.entropy_count, torch.Tensor) else 1.0
        return self.entropy_sum / count
