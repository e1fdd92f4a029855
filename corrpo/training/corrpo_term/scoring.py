"""The two scoring paths of the CorR-PO term: a pass of its own, or the update's own forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from corrpo.generation.rollout import Rollout
from corrpo.inversion.strength_common import ScoringBatch, checkpointed_modules, chosen_logits
from corrpo.inversion.strength_onepass import onepass_on_forward
from corrpo.models.architectures import decoder_parts
from corrpo.models.packing import PackedBatch, model_width, packed_logits, packing_unsupported_reason
from corrpo.models.sharding import gathered_copy, is_sharded
from corrpo.training.corrpo_term.bonus import CorrPOTerm, corrpo_bonus
from corrpo.training.corrpo_term.config import CorrPOTermConfig
from corrpo.training.corrpo_term.correlations import response_correlations, rollout_correlations
from corrpo.training.forward import completion_logits, completion_scores


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
    temperature: float = 1.0,
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

    ``temperature`` (``rl.sampling.temperature``): the returned log-probs and entropies, the update's, are on
    ``logits / T`` (TRL's); the term's ``H_t`` and ``S_t`` stay on the raw logits at any ``T``, the statistic the
    paper defines and the tracker measures, so ``H_t`` is then a second pass over the same logits.
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
    log_probs, token_entropy = completion_scores(kept["logits"], rollout, temperature=temperature)
    raw_entropy = token_entropy
    if temperature != 1.0:
        with torch.no_grad():
            raw_entropy = completion_scores(kept["logits"].detach(), rollout)[1]
    entropy = raw_entropy.masked_fill(~rollout.completion_mask.bool(), float("nan"))
    rho, n_tokens = response_correlations(entropy, strength, rollout.completion_mask, config.correlation)
    term = _term(rho, n_tokens, entropy, strength, config, rl_index, group_size, shared_forward=True)
    return term, (log_probs, token_entropy)
