"""Where the decoder layers, attention projections, MLP weights and unembedding live in supported models.

Supported: HF ``Qwen2ForCausalLM`` and ``LlamaForCausalLM`` (and subclasses). Both are
``model.model.layers[i].self_attn.{q,k,v,o}_proj`` / ``.mlp.{gate,up,down}_proj``, a final RMSNorm inside
``model.model`` and an ``lm_head`` Linear, with RoPE applied to q and k after the projections (no q/k norm).
Anything else raises a ``ValueError`` naming the model class: the closed forms in ``strength_onepass``
depend on exactly this layout, so silently guessing would produce wrong numbers.

LoRA (PEFT): a ``PeftModel`` is unwrapped to the model it adapts (``base_model.model``), whose layers then hold
``lora.Linear`` wrappers in place of the targeted projections. :func:`projection` returns the WRAPPER: its
input ``x`` and output ``y = (W + s B A) x + b`` are those of the effective linear map, so forward hooks on it
see what the closed forms need, and its ``.weight`` is the base ``W``, whose gradient ``g x^T`` is exactly
the gradient w.r.t. ``W_eff = W + s B A``. So every method measures the strength on the effective weights.
DoRA rescales ``W_eff`` by a norm of ``W``, which breaks that identity, and is rejected.

FSDP: not supported. The strengths read whole projection weights and their gradients (nuclear norms of
``[d_out, d_in]`` matrices), which FSDP shards flat across ranks outside its forward; scoring would need
``summon_full_params`` around every probe. Use DDP (every rank holds the whole model), with LoRA if the
model is large.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

SUPPORTED_CLASSES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")
_PROJECTION_PATHS = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a supported causal LM the strength code needs.

    ``base(input_ids, attention_mask, position_ids)`` returns the FINAL-NORMED hidden states, and
    ``logits = unembed(hidden)`` exactly as the HF ``*ForCausalLM.forward`` does it.
    """

    base: nn.Module
    layers: nn.ModuleList
    unembed: nn.Linear


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (``PeftModel`` or its ``LoraModel``), else ``model``.

    Matched by class name so that PEFT stays an optional dependency.
    """
    names = {cls.__name__ for cls in type(model).__mro__}
    if "PeftModel" in names:
        return model.get_base_model()
    if "BaseTuner" in names:
        return model.model
    return model


def _supported_class_name(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_CLASSES:
            return cls.__name__
    return None


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Return the base decoder, its layer list and the unembedding of a supported model, else ValueError.

    A PEFT-wrapped model is unwrapped first (:func:`unwrap_adapters`).
    """
    model = unwrap_adapters(model)
    if _supported_class_name(model) is None:
        raise ValueError(
            f"gradient strength supports {', '.join(SUPPORTED_CLASSES)} only; got {type(model).__name__}. "
            "Add its layer/projection layout to corrpo/inversion/architectures.py to support it."
        )
    base = model.model
    unembed = model.lm_head
    if not isinstance(unembed, nn.Linear):
        raise ValueError(f"{type(model).__name__}.lm_head must be nn.Linear, got {type(unembed).__name__}")
    return DecoderParts(base=base, layers=base.layers, unembed=unembed)


def expand_projections(projections: Sequence[str]) -> tuple[str, ...]:
    """Turn config projections into matrix names: ``"mlp"`` becomes ``gate``, ``up``, ``down``."""
    out: list[str] = []
    for name in projections:
        out.extend(MLP_PROJECTIONS if name == "mlp" else (name,))
    return tuple(out)


def projection(layer: nn.Module, name: str) -> nn.Module:
    """The module for projection ``name`` (q|k|v|o|gate|up|down) of one decoder layer.

    An ``nn.Linear``, or a LoRA ``lora.Linear`` wrapping one (module docstring): either way its forward input
    and output are those of the effective linear map and ``.weight`` is a parameter whose gradient is
    ``dz/dW_eff``.
    """
    if name not in _PROJECTION_PATHS:
        raise ValueError(f"unknown projection {name!r}; expected one of {sorted(_PROJECTION_PATHS)}")
    parent, child = _PROJECTION_PATHS[name]
    module = getattr(getattr(layer, parent), child)
    if len(getattr(module, "lora_magnitude_vector", ())):
        raise ValueError(
            f"{name}_proj uses DoRA: its gradient strength is not defined here (use plain LoRA, model.lora)"
        )
    return module


def resolve_layers(layers: str | Sequence[int], num_layers: int) -> list[int]:
    """``"last"`` -> ``[n-1]``, ``"all"`` -> ``[0..n-1]``, ints (negative allowed) -> sorted unique."""
    if layers == "last":
        return [num_layers - 1]
    if layers == "all":
        return list(range(num_layers))
    out = set()
    for idx in layers:
        if not -num_layers <= idx < num_layers:
            raise ValueError(f"layer index {idx} out of range for a model with {num_layers} layers")
        out.add(idx % num_layers)
    return sorted(out)


def select_weights(
    model: nn.Module, layers: str | Sequence[int], projections: Sequence[str]
) -> list[tuple[str, nn.Parameter]]:
    """The selected weight matrices as ``(name, parameter)``; weights only, never biases."""
    parts = decoder_parts(model)
    names = expand_projections(projections)
    return [
        (f"layers.{i}.{name}", projection(parts.layers[i], name).weight)
        for i in resolve_layers(layers, len(parts.layers))
        for name in names
    ]
