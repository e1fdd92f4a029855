r"""The CorR-PO term, in one home: its config, the bonus, both ways of scoring it, and its result.

The paper does not publish its formula; ours is explicit and configurable (``rl.inversion.*``,
:class:`CorrPOTermConfig`):

.. math::
    r_i' = r_{\text{task},i} + \lambda \cdot \operatorname{clip}(-\rho_i, -1, 1)

where :math:`\rho_i` is the Spearman (or Pearson) correlation between token entropy :math:`H_t` (bits) and the
gradient strength :math:`S_t` of the chosen token's raw logit, over response :math:`i`'s OWN completion tokens
only. :math:`r_i'` then enters the usual group-normalised GRPO advantage; :math:`\lambda = 0` is plain GRPO
(nothing is computed).

Why per response: the advantage ranks the ``G`` responses to one prompt against each other, so the bonus must
differ between them; a batch-level correlation would add the same constant to every member of a group and
cancel in the group mean. Pooling over the prompt tokens would mix in text the policy did not choose.

Why the clip: :math:`\rho \in [-1, 1]` already; the clip only guards a rounding excursion and documents the
scale (the bonus is at most :math:`|\lambda|`, comparable to a 0/1 accuracy reward when :math:`\lambda \le 1`).

Responses with too few scored tokens (``min_tokens``) or an undefined correlation (constant entropy, < 2 tokens)
get bonus 0 and ``valid = False``: never NaN, which ``group_advantages`` would reject.

Two scoring paths give the same :class:`CorrPOTerm`: :func:`corrpo_term` scores the rollout in a pass of its own
(:func:`corrpo.inversion.strength.score_tokens`, any strength method); :func:`corrpo_term_on_update_forward` scores
it on the update's own forward where that is exact (:func:`shares_update_forward`), at no forward of its own. The
measurement itself (entropy, strengths, correlations) lives in :mod:`corrpo.inversion`: nothing is re-implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from corrpo.generation.rollout import Rollout
from corrpo.inversion.correlation import batched_pearson, batched_spearman
from corrpo.inversion.strength import score_tokens
from corrpo.inversion.strength_common import ScoringBatch, checkpointed_modules, chosen_logits
from corrpo.inversion.strength_config import REWARD_STRENGTH_DEFAULTS, StrengthConfig, strength_spec
from corrpo.inversion.strength_onepass import onepass_on_forward
from corrpo.models.architectures import decoder_parts
from corrpo.models.packing import PackedBatch, model_width, packed_logits, packing_unsupported_reason
from corrpo.models.sharding import gathered_copy, is_sharded
from corrpo.rewards.combine import RewardScores
from corrpo.training.forward import completion_logits, completion_scores

__all__ = [
    "CORRELATIONS",
    "CorrPOTerm",
    "CorrPOTermConfig",
    "corrpo_bonus",
    "corrpo_term",
    "corrpo_term_on_update_forward",
    "response_correlations",
    "rollout_correlations",
    "shares_update_forward",
    "with_reward_term",
]

CORRELATIONS = ("spearman", "pearson")


@dataclass
class CorrPOTermConfig:
    """``rl.inversion``: the CorR-PO term ``lambda * clip(-rho_i, -1, 1)``, added to each response's reward."""

    coef: float = 0.0
    """``lambda``, the bonus weight; 0 = plain GRPO (no scoring pass at all)."""
    warmup_steps: int = 0
    """``lambda`` ramps linearly from 0 to ``coef`` over the first ``warmup_steps`` RL steps."""
    correlation: Literal["spearman", "pearson"] = "spearman"
    """``spearman`` (the headline) or ``pearson``."""
    strength: StrengthConfig = field(default_factory=lambda: StrengthConfig(**REWARD_STRENGTH_DEFAULTS))
    """The gradient strength ``S_t`` (:class:`corrpo.inversion.strength_config.StrengthConfig`); its default
    projections are ``[q, v, o]`` (``REWARD_STRENGTH_DEFAULTS``: K is the costly closed form)."""
    min_tokens: int = 8
    """Responses with fewer scored completion tokens get no bonus (too noisy a correlation)."""
    center: bool = False
    """Subtract the mean bonus over each group's valid members (invalid members stay 0)."""
    shared_forward: bool = True
    """Score the term on the update's OWN forward when that is exact (``method: onepass``, the update in one
    micro-batch, no active dropout, no gradient checkpointing): the same bonus without a forward of its own.
    False: always a separate scoring pass (the reference the shared one is tested against)."""
    rows_per_chunk: int | None = None
    """Responses per scoring forward/backward (bounds the scoring pass's memory: its logits are
    ``rows x sequence x vocabulary``); None = ``rl.micro_batch_size``, or 64 when that is unset too."""

    def __post_init__(self) -> None:
        if isinstance(self.coef, bool) or not isinstance(self.coef, int | float) or not math.isfinite(self.coef):
            raise ValueError(f"rl.inversion.coef must be a finite number, got {self.coef!r}")
        if self.coef < 0:
            raise ValueError(f"rl.inversion.coef must be >= 0 (0 = plain GRPO), got {self.coef!r}")
        for key in ("warmup_steps", "min_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"rl.inversion.{key} must be an int, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"rl.inversion.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.min_tokens < 2:
            raise ValueError(
                f"rl.inversion.min_tokens must be >= 2 (a correlation needs 2 tokens), got {self.min_tokens}"
            )
        if self.correlation not in CORRELATIONS:
            raise ValueError(f"rl.inversion.correlation must be one of {CORRELATIONS}, got {self.correlation!r}")
        if not isinstance(self.shared_forward, bool):
            raise ValueError(f"rl.inversion.shared_forward must be true or false, got {self.shared_forward!r}")
        rows = self.rows_per_chunk
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"rl.inversion.rows_per_chunk must be a positive int or null, got {rows!r}")
        self.strength = strength_spec(self.strength, "rl.inversion.strength", REWARD_STRENGTH_DEFAULTS)

    def coef_at(self, rl_step: int) -> float:
        """``lambda`` at 0-based RL step ``rl_step``: ``coef * min(1, rl_step / warmup_steps)``.

        0 at the first RL step, ``coef`` from step ``warmup_steps`` on (at once when ``warmup_steps = 0``).
        The ramp lets the group statistics of the task reward settle before the bonus competes with them.
        """
        if self.warmup_steps <= 0:
            return float(self.coef)
        return float(self.coef) * min(1.0, max(rl_step, 0) / self.warmup_steps)


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


def corrpo_bonus(
    rho: Tensor, n_tokens: Tensor, coef: float, min_tokens: int, group_size: int, center: bool = False
) -> tuple[Tensor, Tensor]:
    """``bonus_i = coef * clip(-rho_i, -1, 1)`` for valid responses, 0 otherwise.

    ``valid_i = isfinite(rho_i) and n_tokens_i >= min_tokens``. Negative ``rho`` (the inversion: high-entropy
    tokens carry weak gradients) earns a positive bonus. With ``center``, each group's valid bonuses are
    shifted by their mean, ``b_i - mean_{j valid in group} b_j``, so the term rewards inversion RELATIVE to
    the siblings; invalid members stay exactly 0. (Note: a shift common to a whole group cancels in the GRPO
    group mean anyway; centring matters for ``scale_rewards: batch|none`` and for groups with invalid members.)

    Args:
        rho: ``[N]`` correlations (NaN allowed), ``N = B * G`` prompt-major.
        n_tokens: ``[N]`` pairs behind each ``rho_i``.
        coef: ``lambda`` (e.g. ``CorrPOTermConfig.coef_at(step)``); 0 gives exact zeros.
        min_tokens: fewest tokens for a valid response.
        group_size: ``G``.
        center: subtract the mean over the valid members of each group.

    Returns:
        ``bonus [N]`` float32 (finite everywhere) and ``valid [N]`` bool.
    """
    if rho.ndim != 1 or rho.shape != n_tokens.shape:
        raise ValueError(f"rho and n_tokens must both be [N], got {tuple(rho.shape)} and {tuple(n_tokens.shape)}")
    if group_size < 1 or rho.numel() % group_size:
        raise ValueError(f"N={rho.numel()} responses is not a multiple of group_size={group_size}")
    valid = rho.isfinite() & (n_tokens >= min_tokens)
    raw = torch.where(valid, (-rho.to(torch.float64)).clamp(-1.0, 1.0), 0.0)
    if center:
        grouped, mask = raw.view(-1, group_size), valid.view(-1, group_size)
        mean = grouped.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
        raw = torch.where(mask, grouped - mean, 0.0).view(-1)
    return (coef * raw).to(torch.float32), valid


@dataclass
class CorrPOTerm:
    """The CorR-PO term's values for one rollout batch (``N = B * G`` responses)."""

    bonus: Tensor
    """``[N]`` float32 ``coef * clip(-rho_i, -1, 1)``, 0 for invalid responses."""
    rho: Tensor
    """``[N]`` float64 per-response correlation (NaN where not computable)."""
    valid: Tensor
    """``[N]`` bool: finite ``rho_i`` over at least ``min_tokens`` tokens."""
    coef: float
    """``lambda`` at this RL step (after the warm-up ramp)."""
    entropy: Tensor
    """``[N, L]`` fp32 ``H_t`` (bits) of each completion token the correlation saw (NaN where not scored)."""
    strength: Tensor
    """``[N, L]`` fp32 ``S_t`` of the same tokens (NaN where not scored)."""
    shared_forward: bool = False
    """Scored on the update's own forward (:func:`corrpo_term_on_update_forward`), not by a separate pass."""


def corrpo_term(
    policy: nn.Module,
    rollout: Rollout,
    config: CorrPOTermConfig,
    rl_index: int,
    group_size: int,
    rows_per_chunk: int = 64,
) -> CorrPOTerm:
    """The CorR-PO term scored in a pass of its own: ``coef_at(rl_index) * clip(-rho_i, -1, 1)`` per response, on
    the policy that sampled it, ``rows_per_chunk`` responses per scoring pass. An
    FSDP2-sharded policy is scored on a gathered full copy (:func:`corrpo.models.sharding.gathered_copy`): exact for
    every strength method."""
    with gathered_copy(policy) as scored:
        rho, n_tokens, entropy, strength = rollout_correlations(
            scored, rollout.sequences, rollout.attention_mask, rollout.token_mask, config, rows_per_chunk
        )
    P = rollout.prompt_length
    return _term(rho, n_tokens, entropy[:, P:], strength[:, P:], config, rl_index, group_size, shared_forward=False)


def _term(
    rho: Tensor, n_tokens: Tensor, entropy: Tensor, strength: Tensor, config: CorrPOTermConfig, rl_index: int,
    group_size: int, shared_forward: bool,
) -> CorrPOTerm:  # fmt: skip
    """The :class:`CorrPOTerm` of per-response correlations: the bonus at this step's ``lambda``."""
    coef = config.coef_at(rl_index)
    bonus, valid = corrpo_bonus(rho, n_tokens, coef, config.min_tokens, group_size, config.center)
    return CorrPOTerm(
        bonus=bonus, rho=rho, valid=valid, coef=coef, entropy=entropy, strength=strength, shared_forward=shared_forward
    )


def shares_update_forward(policy: nn.Module, config: CorrPOTermConfig, n_chunks: int) -> str | None:
    """None when the CorR-PO term can be scored on the update's own forward with the very values a separate
    scoring pass gives; else why not (the separate pass is then used).

    The update's forward runs in training mode with every trainable weight, the scoring pass in eval mode: they
    agree when no dropout is active. The shared forward's graph must live until the advantages exist, so the
    update must be one micro-batch; and checkpointed layers keep no activations for the closed forms.
    """
    if not config.shared_forward:
        return "rl.inversion.shared_forward is false"
    if config.strength.method != "onepass":
        return f"rl.inversion.strength.method is {config.strength.method!r}, not onepass"
    if n_chunks != 1:
        return f"the update runs in {n_chunks} micro-batches (rl.micro_batch_size)"
    if is_sharded(policy):
        return "the policy is FSDP2-sharded (the term is scored on a gathered copy)"
    if checkpointed_modules(policy):
        return "gradient checkpointing is on"
    if has_active_dropout(policy):
        return "the policy has active dropout (its training forward differs from the eval-mode score)"
    return None


def has_active_dropout(model: nn.Module) -> bool:
    """True when a training-mode forward of ``model`` is random: an ``nn.Dropout`` with ``p > 0``, or a config
    dropout rate > 0 (transformers' attention applies ``config.attention_dropout`` functionally)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    keys = ("attention_dropout", "attn_pdrop", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout")
    return any(isinstance(getattr(config, k, 0), float) and getattr(config, k) > 0 for k in keys)


def corrpo_term_on_update_forward(
    policy: nn.Module,
    rollout: Rollout,
    config: CorrPOTermConfig,
    rl_index: int,
    group_size: int,
    packed: bool = False,
) -> tuple[CorrPOTerm, tuple[Tensor, Tensor]]:
    """The CorR-PO term scored on the update's forward (:func:`completion_log_probs`' own forward, run here once
    with the onepass capture): returns the term and that forward's ``(log_probs, entropy)``, the graph kept, for
    the first update to backpropagate through instead of running its forward again.

    ``S_t`` comes from :func:`corrpo.inversion.strength_onepass.onepass_on_forward` (one backward of the chosen
    raw logits to the last layer's activations), ``H_t`` from the update's log-prob pass over the same logits
    (:func:`corrpo.training.objectives.token_log_probs_and_entropy`: :func:`entropy_bits_from_logits`' arithmetic),
    ``rho_i`` from :func:`response_correlations`: the separate pass's functions on the same numbers. ``packed``
    (``rl.packing``): that forward runs on packed rows (:mod:`corrpo.models.packing`) and the closed forms read its
    activations there, with the attention of each token cut to its own sequence (``ScoringBatch.segments``).
    """
    P, (B, T) = rollout.prompt_length, rollout.sequences.shape
    layout = None
    if packed and packing_unsupported_reason(policy) is None:
        # the update's forward runs on packed rows: the closed forms read its activations there, each token
        # attending to its own sequence only (``segments``); (rows, cols) say where each scored token came from
        layout = PackedBatch.build(rollout.sequences, rollout.attention_mask, model_width(policy))
        batch = ScoringBatch.build(
            layout.input_ids, layout.pack(rollout.attention_mask), layout.pack(rollout.token_mask, False),
            layout.segments,
        )  # fmt: skip
        where = layout.padded_index()[batch.rows * layout.input_ids.shape[1] + batch.cols]
        rows, cols = where // T, where % T
    else:
        batch = ScoringBatch.build(rollout.sequences, rollout.attention_mask, rollout.token_mask)
        rows, cols = batch.rows, batch.cols
    kept: dict[str, Tensor] = {}
    parts = decoder_parts(policy)

    def keep_hidden(_module, args, _output):  # the unembedding's input, in the padded layout (after packing's gather)
        kept["hidden"] = args[0]

    def forward() -> Tensor:
        width = rollout.completion_mask.shape[1] + 1
        handle = parts.unembed.register_forward_hook(keep_hidden)
        try:
            if layout is None:
                kept["logits"] = completion_logits(policy, rollout)
            else:
                kept["logits"] = packed_logits(policy, rollout.sequences, rollout.attention_mask, width, layout)
        finally:
            handle.remove()
        # the kept columns start at P - 1: token c is predicted at c - 1, kept index c - P. z from the final
        # hidden state (chosen_logits: the logits' own value, a backward without the vocabulary-wide product)
        return chosen_logits(parts, kept.pop("hidden")[rows, cols - P], rollout.sequences[rows, cols])

    values = onepass_on_forward(policy, batch, config.strength, forward)
    strength = torch.full((B, T), float("nan"), dtype=torch.float32, device=values.device)
    strength[rows, cols] = values.float()
    strength = strength[:, P:]
    # H_t: the update's own pass over the logits (the same fp32 log_softmax and sum as entropy_bits_from_logits,
    # row by row), so the logits are read once, not twice
    log_probs, token_entropy = completion_scores(kept["logits"], rollout)
    entropy = token_entropy.masked_fill(~rollout.completion_mask.bool(), float("nan"))
    rho, n_tokens = response_correlations(entropy, strength, rollout.completion_mask, config.correlation)
    term = _term(rho, n_tokens, entropy, strength, config, rl_index, group_size, shared_forward=True)
    return term, (log_probs, token_entropy)


def with_reward_term(scores: RewardScores, name: str, values: Tensor) -> RewardScores:
    """A new :class:`RewardScores` with one more per-response term ``name`` added to the total (weight 1)."""
    values = values.detach().float().cpu()
    return RewardScores(
        per_function={**scores.per_function, name: values},
        total=scores.total + values,
        n_failed=dict(scores.n_failed),
        n_unscored=dict(scores.n_unscored),
    )
