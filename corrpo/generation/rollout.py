"""Rollouts: G sampled completions per prompt, as tensors the objective can score.

The module depends only on :class:`Generator`; :class:`HFGenerator` (Hugging Face ``generate``) always
works, but is bound by its number of small ops per token. The default,
:class:`corrpo.generation.decode_loop.DecodeLoopGenerator`, emits the same tokens with fewer, larger ops for the
Llama-like families and falls back to :class:`HFGenerator` for the others; for long rollouts on a GPU use
:class:`corrpo.generation.vllm.VLLMGenerator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from corrpo.models.batching import completion_mask
from corrpo.models.finite import require_finite_fields
from corrpo.models.forward import eval_mode
from corrpo.models.sharding import generate_kwargs


@dataclass
class SamplingConfig:
    """How completions are sampled during RL (TRL ``GRPOConfig``'s names and meanings), HF ``generate``'s logits
    processors in its order: repetition penalty, temperature, top-k, top-p, min-p. The update's log-probs use
    ``softmax(logits / temperature)`` only, as TRL's: top-k, top-p, min-p and the penalty shape the rollouts,
    not the loss."""

    temperature: float = 1.0
    """Softmax temperature; must be > 0 (greedy decoding is only used for evaluation)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 64
    """Completion length cap; completions that hit it are 'truncated'."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (after the temperature); 0 = off (TRL ``GRPOConfig.top_k``)."""
    min_p: float | None = None
    """Drop the tokens whose probability (after temperature, top-k, top-p) is below ``min_p`` times the most likely
    one's, in [0, 1]; null = off (TRL ``GRPOConfig.min_p``)."""
    repetition_penalty: float = 1.0
    """Divide a positive logit (multiply a negative one) by it for every token already in the prompt or the
    completion, before the temperature; > 0, 1.0 = off (TRL ``GRPOConfig.repetition_penalty``)."""

    def __post_init__(self) -> None:
        require_finite_fields(self, "rl.sampling")  # a NaN temperature compares false everywhere: empty rollouts
        if self.temperature <= 0:
            raise ValueError("rl.sampling.temperature must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("rl.sampling.top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("rl.sampling.max_new_tokens must be >= 1")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"rl.sampling.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.min_p is not None and (isinstance(self.min_p, bool) or not 0 <= self.min_p <= 1):
            raise ValueError(f"rl.sampling.min_p must be in [0, 1] or null (off), got {self.min_p!r}")
        if isinstance(self.repetition_penalty, bool) or not self.repetition_penalty > 0:
            raise ValueError(f"rl.sampling.repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty!r}")
        self.repetition_penalty = float(self.repetition_penalty)  # HF's processor takes a float only


def sampling_kwargs(sampling: SamplingConfig, greedy: bool) -> dict:
    """The ``model.generate`` keywords of a call, as TRL's GRPOTrainer passes them: greedy is ``do_sample=False``
    alone (the argmax of the logits: no ``rl.sampling`` control applies); a sampled call sets ``temperature``,
    ``top_p``, ``top_k`` (0 overrides HF's default of 50) and ``repetition_penalty`` (1.0 overrides a
    ``generation_config`` one, as TRL's explicit 1.0 does), and ``min_p`` only when set (``None`` leaves the
    model's ``generation_config`` value, as TRL's ``None`` does). A key given here overrides the model's
    ``generation_config``; :func:`corrpo.generation.decode_loop.unsupported_reason` reads the rest."""
    if greedy:
        return dict(do_sample=False)
    kwargs = dict(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty,
    )
    if sampling.min_p is not None:
        kwargs["min_p"] = sampling.min_p
    return kwargs


@dataclass
class Rollout:
    """``N = B * G`` sequences, prompt-major (row ``b * G + g`` is prompt ``b``'s ``g``-th sample)."""

    sequences: torch.Tensor
    """``[N, P + L]`` left-padded prompt then completion (padded after eos)."""
    attention_mask: torch.Tensor
    """``[N, P + L]`` 1 on prompt tokens and on completion tokens up to the first eos."""
    completion_mask: torch.Tensor
    """``[N, L]`` bool, the completion tokens that count."""
    truncated: torch.Tensor
    """``[N]`` bool, the completion hit ``max_new_tokens`` without an eos."""
    prompt_length: int
    """``P``, the padded prompt width: completions start at this column."""

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def token_mask(self) -> torch.Tensor:
        """``[N, P + L]`` bool, :attr:`completion_mask` in sequence coordinates: the sampled tokens that count
        (each predicted by the logits one column to its left), as ``score_tokens`` and the losses take them."""
        mask = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        mask[:, self.prompt_length :] = self.completion_mask
        return mask


class Generator:
    """Samples ``G`` completions per prompt from the current policy: the one thing the module asks of rollouts.

    Subclass and set ``model.generator`` (a class path in the config) to swap the engine:
    :class:`corrpo.generation.decode_loop.DecodeLoopGenerator` (the default), :class:`HFGenerator`
    (``model.generate``) or :class:`corrpo.generation.vllm.VLLMGenerator`.
    The module calls :meth:`sync_weights` before a generation whenever the policy was updated since the last
    one, so an engine that holds its own copy of the weights (vLLM) samples from the current policy.
    """

    def generate(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_generations: int,
        sampling: SamplingConfig,
        eos_token_id: int,
        pad_token_id: int,
        greedy: bool = False,
    ) -> Rollout:
        """``[B, P]`` left-padded prompts -> a prompt-major :class:`Rollout` of ``B * G`` rows."""
        raise NotImplementedError

    def sync_weights(self, model: PreTrainedModel) -> None:
        """Make the engine sample from ``model``'s current weights (no-op for engines that use ``model``)."""


class HFGenerator(Generator):
    """Sampling with ``model.generate`` in eval mode under ``no_grad`` (restores the training mode), with
    :func:`sampling_kwargs`."""

    def generate(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        num_generations: int,
        sampling: SamplingConfig,
        eos_token_id: int,
        pad_token_id: int,
        greedy: bool = False,
    ) -> Rollout:
        ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        mask = prompt_mask.repeat_interleave(num_generations, dim=0)
        kwargs = sampling_kwargs(sampling, greedy)
        with eval_mode(model), torch.no_grad():
            out = model.generate(
                **generate_kwargs(model),  # FSDP2: every rank runs forwards until all are done
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                **kwargs,
            )
        return rollout_from_sequences(out, mask, eos_token_id, pad_token_id)


def rollout_from_sequences(
    sequences: torch.Tensor, prompt_mask: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> Rollout:
    """Build a :class:`Rollout` from ``[prompt | completion]`` rows; tokens after the first eos become pad."""
    prompt_length = prompt_mask.shape[1]
    completion = sequences[:, prompt_length:]
    comp_mask, truncated = completion_mask(completion, eos_token_id)
    completion = torch.where(comp_mask, completion, torch.full_like(completion, pad_token_id))
    sequences = torch.cat([sequences[:, :prompt_length], completion], dim=1)
    attention_mask = torch.cat([prompt_mask, comp_mask.long()], dim=1)
    return Rollout(sequences, attention_mask, comp_mask, truncated, prompt_length)


def rollout_from_token_lists(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completions: list[list[int]],
    num_generations: int,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
) -> Rollout:
    """A :class:`Rollout` from engines that return token lists (vLLM): ``completions[b * G + g]`` for prompt ``b``.

    Each completion is cut after its first eos (kept, as ``model.generate`` does) and right-padded; it is
    ``truncated`` when it has no eos and reached ``max_new_tokens``. An empty completion has an all-false mask.
    """
    if len(completions) != prompt_ids.shape[0] * num_generations:
        raise ValueError(f"{len(completions)} completions for {prompt_ids.shape[0]} prompts x G={num_generations}")
    cut, truncated = [], []
    for tokens in completions:
        tokens = list(tokens)
        if eos_token_id in tokens:
            tokens = tokens[: tokens.index(eos_token_id) + 1]
            truncated.append(False)
        else:
            truncated.append(len(tokens) >= max_new_tokens)
        cut.append(tokens)
    width = max([len(c) for c in cut] + [1])
    rows = torch.full((len(cut), width), pad_token_id, dtype=prompt_ids.dtype)
    comp_mask = torch.zeros((len(cut), width), dtype=torch.bool)
    for i, tokens in enumerate(cut):
        rows[i, : len(tokens)] = torch.as_tensor(tokens, dtype=prompt_ids.dtype)
        comp_mask[i, : len(tokens)] = True
    ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    device = ids.device
    return Rollout(
        sequences=torch.cat([ids, rows.to(device)], dim=1),
        attention_mask=torch.cat([mask, comp_mask.long().to(device)], dim=1),
        completion_mask=comp_mask.to(device),
        truncated=torch.tensor(truncated, dtype=torch.bool, device=device),
        prompt_length=ids.shape[1],
    )


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One :class:`Rollout` from rollouts of consecutive prompt chunks sharing one prompt width (``P``): their
    completions are right-padded to the widest (pad ids, mask False), so rows keep their prompt-major order."""
    if len(rollouts) == 1:
        return rollouts[0]
    if len({r.prompt_length for r in rollouts}) != 1:
        raise ValueError("concat_rollouts: the rollouts must share one prompt width")
    width = max(r.completion_mask.shape[1] for r in rollouts)

    def right_pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    completions = [right_pad(r.completion_ids, pad_token_id) for r in rollouts]
    masks = [right_pad(r.completion_mask, False) for r in rollouts]
    P = rollouts[0].prompt_length
    pairs = list(zip(rollouts, completions, masks, strict=True))
    return Rollout(
        sequences=torch.cat([torch.cat([r.sequences[:, :P], c], 1) for r, c, _ in pairs]),
        attention_mask=torch.cat(
            [torch.cat([r.attention_mask[:, :P], m.to(r.attention_mask.dtype)], 1) for r, _, m in pairs]
        ),
        completion_mask=torch.cat(masks),
        truncated=torch.cat([r.truncated for r in rollouts]),
        prompt_length=P,
    )
