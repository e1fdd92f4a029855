"""VLLMGenerator: rollouts from a colocated vLLM engine, its weights synchronised from the policy.

``pip install "corrpo[vllm]"`` (needs a CUDA GPU). Set it in a config::

    model:
      generator:
        class_path: corrpo.generation.vllm.VLLMGenerator
        init_args: {gpu_memory_utilization: 0.3}

Colocated means the engine lives in the training process, on the same GPU as the policy (TRL's
``vllm_mode="colocate"``): no server, no extra GPU; ``gpu_memory_utilization`` is the share of GPU memory
vLLM may take, leave the rest to training. Under DDP every rank builds its own engine on its own GPU.

Weights: the engine is built lazily at the first generation from the policy's own folder, then
:meth:`sync_weights` (called by the module before any generation that follows a policy update) copies the
current policy tensors in with vLLM's ``load_weights``, so rollouts are always on-policy. With LoRA the
merged weights are sent; with FSDP2 (``ModelParallelStrategy``) every rank gathers the full weights
(:func:`corrpo.models.sharding.full_state_dict`, a collective) and loads them into its own engine. vLLM itself
cannot run on a CPU-only machine and is untested there; the module only depends on
:class:`corrpo.generation.rollout.Generator`, which the tests exercise with a scripted generator, and the sync's
gather is tested on a sharded model with a stand-in engine (``tests/test_sharding.py``).
"""

from __future__ import annotations

import os
import tempfile

import torch
from transformers import PreTrainedModel

from corrpo.generation.rollout import Generator, Rollout, SamplingConfig, rollout_from_token_lists
from corrpo.models.lora import is_peft_model, merged_copy
from corrpo.models.sharding import full_state_dict, is_sharded

INSTALL_HINT = 'model.generator=VLLMGenerator needs vLLM: pip install "corrpo[vllm]" (a CUDA GPU is required)'


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


class VLLMGenerator(Generator):
    """Generation with a colocated ``vllm.LLM``.

    Args:
        gpu_memory_utilization: share of the GPU vLLM may use (the rest is left to training).
        dtype: vLLM weight dtype (``auto`` follows the model config).
        max_model_len: longest prompt + completion; None = the model's limit.
        enforce_eager: skip CUDA graph capture (faster start, slower decode).
        seed: the engine's sampling seed.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        seed: int = 0,
    ) -> None:
        _import_vllm()  # fail at config time, not at the first RL step
        self.options = dict(
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            seed=seed,
        )
        self.llm = None
        self._folder: tempfile.TemporaryDirectory | None = None

    def _engine(self, model: PreTrainedModel):
        if self.llm is None:
            # vLLM loads from a folder: the policy's current weights and config, saved once.
            self._folder = tempfile.TemporaryDirectory(prefix="corrpo-vllm-")
            # FSDP2: every rank gathers the full weights (a collective), each writes its own engine's folder
            sharded = is_sharded(model)
            _merged(model).save_pretrained(self._folder.name, state_dict=full_state_dict(model) if sharded else None)
            # In-process engine core (as TRL's colocate mode): weight syncs are then plain tensor copies.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # collective_rpc with a Python function (the weight loader below) needs it on recent vLLM versions
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            vllm = _import_vllm()
            self.llm = vllm.LLM(model=self._folder.name, skip_tokenizer_init=True, **self.options)
        return self.llm

    def sync_weights(self, model: PreTrainedModel) -> None:
        if self.llm is None:
            return  # built from the current weights at the first generation
        state = full_state_dict(_merged(model))  # whole tensors, gathered on every rank when FSDP2-sharded
        self.llm.collective_rpc(_load_weights, args=(list(state.items()),))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

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
        llm = self._engine(model)
        kwargs = sampling_params_kwargs(sampling, num_generations, eos_token_id, greedy)
        params = _import_vllm().SamplingParams(**kwargs)
        prompts = [
            {"prompt_token_ids": row[m.bool()].tolist()}
            for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        completions = [list(sample.token_ids) for out in outputs for sample in out.outputs]
        return rollout_from_token_lists(
            prompt_ids, prompt_mask, completions, num_generations, eos_token_id, pad_token_id, sampling.max_new_tokens
        )


def sampling_params_kwargs(sampling: SamplingConfig, num_generations: int, eos_token_id: int, greedy: bool) -> dict:
    """``vllm.SamplingParams``' keywords for a call, as TRL's colocated vLLM passes them: greedy is temperature 0
    (vLLM's argmax; no ``rl.sampling`` control applies, as in :func:`corrpo.generation.rollout.sampling_kwargs`);
    a sampled call sets temperature, ``top_p``, ``top_k`` (0 = off in vLLM too), ``min_p`` (0.0 when off) and
    ``repetition_penalty`` (HF's formula, on the prompt and output tokens). vLLM's sampler applies min-p before
    top-k and top-p (HF: after), so with ``top_p < 1`` and ``min_p`` both set its distribution is not HF's."""
    kwargs = dict(n=num_generations, max_tokens=sampling.max_new_tokens, stop_token_ids=[eos_token_id])
    if greedy:
        return dict(kwargs, temperature=0.0, top_p=1.0)
    return dict(
        kwargs,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=0.0 if sampling.min_p is None else sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
    )


def _merged(model: PreTrainedModel) -> PreTrainedModel:
    """The plain HF model vLLM can load: a LoRA policy merged (on a copy), else the model itself."""
    return merged_copy(model) if is_peft_model(model) else model


def _load_weights(worker, weights) -> None:
    """Runs inside each vLLM worker: hand the named tensors to the model's own ``load_weights``."""
    worker.model_runner.model.load_weights(weights=weights)
