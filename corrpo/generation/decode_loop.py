"""The lean decode loop as a :class:`Generator`: HF ``generate``'s outputs with far fewer ops per decoded token.

:class:`DecodeLoopGenerator` (the default ``model.generator``) holds three things, and only these:

* **the capability policy** (:func:`unsupported_reason`): whether the lean loop reproduces ``model.generate``
  for this model and call. First the family: its layout must give the decode step what it reads
  (:data:`SUPPORTED_FAMILIES`: the layout table filtered by :func:`~corrpo.generation.decode_step.layout_gap`,
  today Llama, Mistral, Qwen2, Qwen3 and Gemma) and the model's own modules must have the form the step
  computes (:func:`~corrpo.generation.decode_step.family_gap`: a plain embedding, ``w * x / rms(x)`` norms --
  Gemma's scaled embedding falls back here). Then, whatever the family: fp32, SDPA attention, plain
  ``nn.Linear`` projections (no LoRA wrappers), a stateless RoPE type, no FSDP2 shards, no sliding window shorter
  than prompt + completion and no ``generation_config`` setting that changes HF's logits
  (:data:`NEUTRAL_GENERATION_SETTINGS`: a repetition penalty, a minimum length, ...) unless the call's own
  keywords (:func:`~corrpo.generation.rollout.sampling_kwargs`) override it;
* **the fallback**: any other model goes to ``fallback`` (:class:`corrpo.generation.rollout.HFGenerator` by
  default), the reason kept in :attr:`DecodeLoopGenerator.fallback_reason` and logged once per reason;
* **the loop**: prefill (:func:`~corrpo.generation.decode_step.prefill`), then per token the repetition penalty
  of a sampled call (:func:`~corrpo.generation.sampling.penalize_repetitions`, over the prompt's and the drawn
  tokens), a draw (:func:`~corrpo.generation.sampling.draw_tokens`: temperature, top-k, top-p, min-p), the eos
  bookkeeping and one
  :class:`~corrpo.generation.decode_step.DecodeStep`. Once at most ``compact_below`` (7/8) of the computed rows
  are unfinished, the finished ones leave the batch, so a row costs nothing after its eos; HF computes every row
  to the last step. The loop stops as soon as every row has emitted eos; rows that finished get the pad token,
  as HF writes them.

The draws consume the RNG as HF's ``_sample`` does on the whole batch, finished rows included, and greedy is
``argmax`` of the fp32 logits. So greedy outputs equal HF ``generate``'s, samples come from the same
distribution and, with the same seed, are the same tokens; ``tests/test_fast_decode.py`` checks all three on
several families. Forward hooks on the policy's submodules do not run during decoding (the prefill runs them).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from corrpo.generation.decode_step import (
    STEP_FAMILIES,
    STEP_MATRICES,
    family_gap,
    layout_gap,
    listed_layout,
    module_at,
    prefill,
)
from corrpo.generation.rollout import (
    Generator,
    HFGenerator,
    Rollout,
    SamplingConfig,
    rollout_from_sequences,
    sampling_kwargs,
)
from corrpo.generation.sampling import draw_tokens, penalize_repetitions, prompt_tokens_seen
from corrpo.models.architectures import unwrap_adapters
from corrpo.models.forward import eval_mode
from corrpo.models.sharding import is_sharded

SUPPORTED_FAMILIES = STEP_FAMILIES
"""The layout families the lean loop may serve (the layout table's, filtered by what the decode step reads)."""
STATELESS_ROPE = ("default", "linear", "llama3", "yarn")
logger = logging.getLogger(__name__)
# generation_config settings that make HF generate change the logits or stop differently, with their values that
# do nothing: any other value (Qwen2.5-Instruct ships repetition_penalty 1.05) means the lean loop would differ.
NEUTRAL_GENERATION_SETTINGS: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "sequence_bias": (None,),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "typical_p": (None, 1.0),
    "min_p": (None, 0.0),
    "top_h": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "max_time": (None,),
}


def unsupported_reason(model: PreTrainedModel, total_length: int, overridden: Collection[str] = ()) -> str | None:
    """Why :class:`DecodeLoopGenerator` cannot reproduce ``model.generate`` for ``model`` (``None``: it can).

    ``overridden``: the ``generate`` keywords the call sets itself (:func:`~corrpo.generation.rollout.sampling_kwargs`),
    whose ``generation_config`` values then do not apply."""
    config = model.config
    family = getattr(config, "model_type", None)
    inner = unwrap_adapters(model)  # its family; the adapters themselves are refused below
    layout = listed_layout(inner)
    if layout is None:
        return f"model_type {family!r} is not one of {SUPPORTED_FAMILIES}"
    gap = layout_gap(layout) or family_gap(inner, layout)
    if gap is not None:
        return f"model_type {family!r}: {gap}"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attn_implementation {config._attn_implementation!r} (the lean loop mirrors the sdpa path)"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATELESS_ROPE:
        return f"rope_type {rope_type!r} updates its frequencies with the sequence length"
    if getattr(config, "pretraining_tp", 1) > 1:
        return "pretraining_tp > 1"
    generation_config = getattr(model, "generation_config", None)
    for key, neutral in NEUTRAL_GENERATION_SETTINGS.items():
        if key in overridden:
            continue
        value = getattr(generation_config, key, None)
        if value not in neutral:
            return f"generation_config.{key} = {value!r} (HF generate applies it; the lean loop does not)"
    if is_sharded(model):
        return "the policy is FSDP2-sharded (its weights are per-rank shards; HF generate gathers them per layer)"
    layers = getattr(getattr(model, layout.base, None), layout.layers, None)
    unembed = getattr(model, layout.unembed, None)
    if layers is None or not isinstance(unembed, nn.Linear):
        return f"{type(model).__name__} has no {layout.base}.{layout.layers} / {layout.unembed}.Linear"
    for i, layer in enumerate(layers):
        if any(type(module_at(layer, layout.slots[name].path)) is not nn.Linear for name in STEP_MATRICES):
            return f"layer {i} has projections that are not plain nn.Linear (adapters?)"
        attn = getattr(layer, layout.attention)
        window = config.sliding_window if layout.window_from_config else getattr(attn, "sliding_window", None)
        if window is not None and window < total_length:
            return f"layer {i} has a sliding window ({window}) shorter than prompt + completion ({total_length})"
    if unembed.weight.dtype != torch.float32:
        return f"dtype {unembed.weight.dtype} (F.rms_norm equals the HF norm in fp32 only)"
    return None


class DecodeLoopGenerator(Generator):
    """The lean decode loop (module docstring) for the families it supports, ``fallback`` for the others.

    ``fallback_reason`` is ``None`` after a call that ran the lean loop, else why it fell back (logged once
    per reason at INFO). ``compact_below``: once the unfinished rows are at most this fraction of the rows the
    step computes, the finished ones are dropped from the batch (their cache rows, bias and rotary rows with
    them); 0 never drops any. Dropping is a copy of the kept rows' caches, so doing it in steps of 1/8 keeps
    its cost small against the rows it saves.
    """

    def __init__(self, fallback: Generator | None = None, compact_below: float = 0.875) -> None:
        if not 0.0 <= compact_below <= 1.0:
            raise ValueError(f"compact_below must be in [0, 1], got {compact_below}")
        self.compact_below = compact_below
        self.fallback = fallback if fallback is not None else HFGenerator()
        self.fallback_reason: str | None = None
        self._logged: set[str] = set()

    def generate(
        self,
        model: PreTrainedModel,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        num_generations: int,
        sampling: SamplingConfig,
        eos_token_id: int,
        pad_token_id: int,
        greedy: bool = False,
    ) -> Rollout:
        total_length = prompt_ids.shape[1] + sampling.max_new_tokens
        self.fallback_reason = unsupported_reason(model, total_length, sampling_kwargs(sampling, greedy).keys())
        if self.fallback_reason is not None:
            if self.fallback_reason not in self._logged:
                self._logged.add(self.fallback_reason)
                engine = type(self.fallback).__name__
                logger.info("DecodeLoopGenerator falls back to %s: %s", engine, self.fallback_reason)
            return self.fallback.generate(
                model, prompt_ids, prompt_mask, num_generations, sampling, eos_token_id, pad_token_id, greedy
            )
        with eval_mode(model), torch.no_grad():
            sequences = self._decode(
                model, prompt_ids, prompt_mask, num_generations, sampling, eos_token_id, pad_token_id, greedy
            )
        mask = prompt_mask.repeat_interleave(num_generations, dim=0)
        return rollout_from_sequences(sequences, mask, eos_token_id, pad_token_id)

    def _decode(
        self,
        model: PreTrainedModel,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        G: int,
        sampling: SamplingConfig,
        eos_token_id: int,
        pad_token_id: int,
        greedy: bool,
    ) -> Tensor:
        """``[B * G, P + steps]`` prompt-major sequences (``steps <= max_new_tokens``: all rows may stop early)."""
        B, P = prompt_ids.shape
        N, L = B * G, sampling.max_new_tokens
        step, logits = prefill(model, prompt_ids, prompt_mask, G, L)
        sequences = torch.full((N, P + L), pad_token_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
        sequences[:, :P] = prompt_ids.repeat_interleave(G, dim=0)
        rows = torch.arange(N, device=prompt_ids.device)  # the rows the decode step still computes
        finished = torch.zeros(N, dtype=torch.bool, device=prompt_ids.device)  # over `rows`
        penalty = 1.0 if greedy else sampling.repetition_penalty  # greedy: the logits' argmax, as HFGenerator's
        seen = None  # over `rows`: [n, V], the tokens of each row's prompt and completion so far
        if penalty != 1.0:
            seen = prompt_tokens_seen(prompt_ids, prompt_mask, logits.shape[-1]).repeat_interleave(G, dim=0)
        steps = 0
        for t in range(L):
            if seen is not None:
                logits = penalize_repetitions(logits, seen, penalty)
            drawn = draw_tokens(logits, rows, N, sampling, greedy)
            if seen is not None:  # a finished row's marks are never read: its draws become pad
                seen[torch.arange(len(rows), device=seen.device), drawn] = True
            tokens = drawn.masked_fill(finished, pad_token_id)
            sequences[rows, P + t] = tokens
            steps = t + 1
            finished |= tokens == eos_token_id
            done = int(finished.sum())
            if t == L - 1 or done == len(rows):
                break
            if done and len(rows) - done <= self.compact_below * len(rows):
                keep = (~finished).nonzero().squeeze(1)
                rows, finished, tokens = rows[keep], finished[keep], tokens[keep]
                seen = None if seen is None else seen[keep]
                step.keep_rows(keep, t)
            logits = step.next_logits(tokens, t)
        return sequences[:, : P + steps]
