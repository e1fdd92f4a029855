"""FSDP2 sharding of the policy: ``torch.distributed.fsdp.fully_shard`` per decoder layer, then the root.

Used when ``trainer.strategy`` is Lightning's ``ModelParallelStrategy`` (``data_parallel_size = N``,
``tensor_parallel_size = 1``): :meth:`corrpo.module.CorrPOModule.configure_model` calls :func:`shard_policy` on
the policy (and the KL reference) with the strategy's device mesh. Each rank then holds ``1/N`` of every
parameter, gradient and AdamW moment; a layer's full weights exist only while it runs (FSDP2 all-gathers them
before its forward and backward and frees them after), and gradients are reduce-scattered, so a step is the
data-parallel step of the whole batch, as under DDP. The engine is torch's; this file only says what to wrap.

Three things need the whole model, and each gets it through one collective:

- :func:`full_state_dict`: every parameter gathered whole (the policy export, the vLLM weight sync);
- :func:`gathered_copy`: a plain, unsharded copy of the model for code that reads weights directly (the
  inversion probes and the CorR-PO scoring pass: every strength method reads the unembedding and some read
  projection weights), so every method is exact under sharding, at the cost of one full parameter copy per
  rank while it runs;
- HF ``generate`` on the sharded model needs every rank to run the same number of forwards: it is called with
  ``synced_gpus=True`` (:func:`generate_kwargs`), and every rank makes the same number of generate calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from corrpo.models.architectures import decoder_parts

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ShardingConfig:
    """FSDP2 options, used when ``trainer.strategy`` is ``ModelParallelStrategy`` (ignored, and must stay at
    their defaults, under any other strategy)."""

    param_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Mixed precision: dtype the gathered weights are cast to for forward/backward (None: the stored dtype)."""
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Mixed precision: dtype of the gradient reduce-scatter (None: ``param_dtype``)."""
    cpu_offload: bool = False
    """Keep the parameter shards, gradients and optimizer step on the CPU (FSDP2's ``CPUOffloadPolicy``)."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (re-gathered for the backward): less memory."""

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"model.sharding.{key} must be one of {', '.join(DTYPES)} or null, got {value!r}")
        for key in ("cpu_offload", "reshard_after_forward"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.sharding.{key} must be true or false, got {getattr(self, key)!r}")


def fsdp_kwargs(config: ShardingConfig) -> dict:
    """The keyword arguments of ``fully_shard`` for ``config`` (mixed precision, offload, resharding)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict = {"reshard_after_forward": config.reshard_after_forward}
    if config.param_dtype is not None or config.reduce_dtype is not None:
        param = getattr(torch, config.param_dtype) if config.param_dtype else None
        reduce = getattr(torch, config.reduce_dtype) if config.reduce_dtype else None
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
    if config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (or a submodule) was wrapped by ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard_policy(model: nn.Module, mesh, config: ShardingConfig) -> nn.Module:
    """``fully_shard`` every decoder layer of ``model`` (one all-gather unit each), then the root (embeddings,
    final norm, unembedding) over the 1-D ``mesh``; in place, returns ``model``. Idempotent."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    kwargs = fsdp_kwargs(config)
    for layer in decoder_parts(model).layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    # the root's own parameters are needed last in the backward: no point freeing them after the forward
    fully_shard(model, mesh=mesh, **{**kwargs, "reshard_after_forward": False})
    return model


def shard_policies(mesh, config: ShardingConfig, lora: bool, *models: nn.Module | None) -> None:
    """What a module's ``configure_model`` does: under Lightning's ``ModelParallelStrategy`` (``mesh`` is its
    ``device_mesh``) :func:`shard_policy` each of ``models`` that is not None over the data-parallel mesh; without a
    mesh nothing, but ``model.sharding`` options then are an error, as are tensor parallelism and LoRA under FSDP2."""
    if mesh is None:
        if config != ShardingConfig():
            raise ValueError(
                "model.sharding is set but trainer.strategy is not ModelParallelStrategy: it only applies to "
                "FSDP2 (see configs/scale/fsdp2.yaml)"
            )
        return
    if mesh.ndim > 1 and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "trainer.strategy.tensor_parallel_size must be 1: corrpo shards with FSDP2 (data parallel) only, "
            "tensor parallelism is not supported"
        )
    if lora:
        raise ValueError("model.lora with ModelParallelStrategy (FSDP2) is not supported: use DDP with LoRA")
    dp_mesh = mesh["data_parallel"] if mesh.ndim > 1 else mesh
    for model in models:
        if model is not None:
            shard_policy(model, dp_mesh, config)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every parameter whole, on the CPU. A collective when ``model`` is sharded
    (every rank calls it, every rank gets the full tensors); else the plain ``state_dict()``."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


@contextlib.contextmanager
def gathered_copy(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` itself when it is not sharded; else (a collective) a plain copy with the full weights, same
    class, config, buffers and train/eval mode, freed on exit. The copy shares nothing with ``model``'s shards:
    gradients taken on it do not touch the training state."""
    if not is_sharded(model):
        yield model
        return
    from transformers import AutoModelForCausalLM

    state = full_state_dict(model)
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(state, assign=True, strict=False)
    device = next(iter(state.values())).device
    buffers = dict(model.named_buffers())  # FSDP2 leaves buffers whole (rotary inv_freq, ...)
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:  # non-persistent: not in any state dict
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner)._buffers[leaf] = buffers[name].to(device)
    if getattr(copy.config, "tie_word_embeddings", False):
        copy.tie_weights()
    meta = [n for n, p in copy.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"gathered_copy: parameters missing from the gathered state dict: {meta[:4]}")
    copy.train(model.training)
    wants_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, param in copy.named_parameters():
        param.requires_grad_(wants_grad.get(name, False))
    try:
        yield copy
    finally:
        del copy, state


def generate_kwargs(model: nn.Module) -> dict:
    """Extra ``generate`` arguments for ``model``: ``synced_gpus=True`` when it is sharded, so that every rank
    keeps running forwards (each one all-gathers) until the slowest rank's batch is finished."""
    return {"synced_gpus": True} if is_sharded(model) else {}
