"""Where the decoder layers, attention projections, MLP weights and unembedding live in a supported model.

The per-family tables live in :mod:`corrpo.models.families` (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3,
OLMo 2, Granite, Phi-3, GPT-2, GPT-NeoX, the MoE / MLA families Qwen3-MoE, Mixtral, OLMoE, gpt-oss and DeepSeek-V3,
plus a generic layout for unlisted models with separate q/k/v/o Linears). This module turns a model and a layout
into what the methods use: :class:`DecoderParts` (the base decoder, its layers, the unembedding and the family's
logit map) and :class:`Matrix` (one logical ``[d_out, d_in]`` weight matrix, possibly a row block of a fused
parameter, or an expert stack measured as its block diagonal).

LoRA (PEFT): a ``PeftModel`` is unwrapped to the model it adapts (``base_model.model``), whose layers then hold
``lora.Linear`` wrappers in place of the targeted projections. :func:`projection` returns the WRAPPER: its
input ``x`` and output ``y = (W + s B A) x + b`` are those of the effective linear map, so forward hooks on it
see what the closed forms need, and its ``.weight`` is the base ``W``, whose gradient ``g x^T`` is exactly
the gradient w.r.t. ``W_eff = W + s B A``. So every method measures the strength on the effective weights.
DoRA rescales ``W_eff`` by a norm of ``W``, which breaks that identity, and is rejected.

FSDP2: the strengths read whole projection weights and the unembedding (nuclear norms of ``[d_out, d_in]``
matrices, ``W_U[y]`` rows), which ``fully_shard`` keeps as 1/N shards outside each layer's own forward. Every
caller (the InversionTracker, the CorR-PO term) therefore scores a gathered, unsharded copy of the policy
(:func:`corrpo.models.sharding.gathered_copy`); the functions here always see whole weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from corrpo.models.families import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    FamilyLayout,
    find_layout,
    supported_families,
)

__all__ = [
    "ATTENTION_PROJECTIONS",
    "MLP_PROJECTIONS",
    "DecoderParts",
    "Matrix",
    "Projection",
    "decoder_parts",
    "expand_projections",
    "projection",
    "resolve_layers",
    "select_matrices",
    "select_weights",
    "supported_families",
    "unique_weights",
    "unwrap_adapters",
]


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a supported causal LM the strength code needs.

    ``base(input_ids, attention_mask, position_ids)`` returns the FINAL-NORMED hidden states, and
    ``logits = logit_map(unembed(hidden))`` exactly as the HF ``*ForCausalLM.forward`` does it (:meth:`logits`);
    ``logit_map`` is the identity except for Gemma 2/3's final soft-capping and Granite's ``/ logits_scaling``.
    """

    base: nn.Module
    layers: nn.ModuleList
    unembed: nn.Linear
    layout: FamilyLayout
    config: object
    logit_map: Callable[[Tensor], Tensor]

    def logits(self, hidden: Tensor) -> Tensor:
        return self.logit_map(self.unembed(hidden))


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


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The base decoder, layers, unembedding and logit map of a supported model, else ValueError.

    A PEFT-wrapped model is unwrapped first (:func:`unwrap_adapters`).
    """
    model = unwrap_adapters(model)
    layout = find_layout(model)
    unembed = _get(model, layout.unembed)
    if not isinstance(unembed, nn.Linear):
        raise ValueError(f"{type(model).__name__}.{layout.unembed} must be nn.Linear, got {type(unembed).__name__}")
    base = _get(model, layout.base)
    return DecoderParts(
        base=base,
        layers=_get(base, layout.layers),
        unembed=unembed,
        layout=layout,
        config=model.config,
        logit_map=layout.logit_map(model.config),
    )


def expand_projections(projections: Sequence[str], layout: FamilyLayout | None = None) -> tuple[str, ...]:
    """Turn config projections into matrix names: ``"mlp"`` becomes the family's MLP matrices.

    ``gate, up, down`` for gated MLPs; ``up, down`` for GPT-2 / GPT-NeoX (no gate).
    """
    mlp = layout.mlp_names if layout is not None else MLP_PROJECTIONS
    out: list[str] = []
    for name in projections:
        out.extend(mlp if name == "mlp" else (name,))
    return tuple(out)


@dataclass(frozen=True)
class Projection:
    """One logical matrix's module in one layer: an ``nn.Linear``, a LoRA wrapper of one, a ``Conv1D``, or an
    experts module holding a stack ``[E, out, in]`` (``experts``; its forward input is the routed hidden states).

    ``features``: its output features inside a fused module (``None`` = all); ``transposed``: the weight is
    stored ``[in, out]`` (Conv1D, gpt-oss experts). The module's forward input is the matrix's input ``a``; its
    output restricted to ``features`` is the matrix's output, so ``dz/dW = delta a^T`` with ``delta`` that output's
    cotangent (not for experts: :mod:`corrpo.inversion.strength_moe` recomputes each routed expert).
    ``shared``: an always-on shared expert's Linear, one more block of the same matrix (DeepSeek-V3).
    """

    module: nn.Module
    features: Tensor | None
    transposed: bool
    param: str = "weight"
    experts: bool = False
    shared: nn.Module | None = None

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.param)

    def output(self, full: Tensor) -> Tensor:
        """The matrix's output features ``[..., d_out]`` from the module's full output."""
        if self.features is None:
            return full
        return full.index_select(-1, self.features.to(full.device))


def _walk(module: nn.Module, path: tuple[str, ...]) -> nn.Module | None:
    for attr in path:
        module = getattr(module, attr, None)
        if module is None:
            return None
    return module


def projection(parts: DecoderParts, layer: nn.Module, name: str) -> Projection:
    """Projection ``name`` (q|k|v|o|gate|up|down) of one decoder layer of the family ``parts.layout``.

    A slot whose path is absent in this layer reads its ``alt`` path (an MoE model's dense layers)."""
    slot = parts.layout.slots.get(name)
    if slot is None:
        raise ValueError(
            f"{parts.layout.name} has no {name!r} matrix; it has {sorted(parts.layout.slots)} ('mlp' = "
            f"{', '.join(parts.layout.mlp_names)})"
        )
    module = _walk(layer, slot.path)
    experts, param, features, shared = slot.experts, slot.param, slot.features, slot.shared
    if module is None and slot.alt is not None:
        module, experts, param, features, shared = _walk(layer, slot.alt), False, "weight", slot.alt_features, None
    if module is None:
        raise ValueError(f"{parts.layout.name}: a layer has no {'.'.join(slot.path)} for its {name!r} matrix")
    if len(getattr(module, "lora_magnitude_vector", ())):
        raise ValueError(f"{name} uses DoRA: its gradient strength is not defined here (use plain LoRA, model.lora)")
    features = None if features is None else features(parts.config)
    transposed = parts.layout.experts_transposed if experts else parts.layout.conv1d
    shared_module = None if shared is None else _walk(layer, shared)
    return Projection(module, features, transposed, param, experts, shared_module)


@dataclass(frozen=True)
class Matrix:
    """A selected logical weight matrix: ``name`` (``layers.3.q``), its stored parameter and how to read it.

    ``experts``: the parameter is an expert stack, measured as its block diagonal (:mod:`corrpo.models.families`);
    ``also``: further blocks of the same block diagonal (DeepSeek-V3's shared expert)."""

    name: str
    weight: nn.Parameter
    features: Tensor | None
    transposed: bool
    experts: bool = False
    also: tuple[Matrix, ...] = ()

    def gradient(self, grad: Tensor) -> Tensor:
        """``dz/dW`` as ``[..., d_out, d_in]`` from the stored parameter's gradient (batched or not).

        Conv1D stores ``[in, out]``, so its gradient is transposed first; a fused parameter's gradient is then
        restricted to this matrix's rows. Every measure (nuclear, Frobenius, l1) is transpose-invariant. An expert
        stack gives ``[..., E, d_out, d_in]``.
        """
        if self.transposed:
            grad = grad.mT
        if self.features is not None:
            grad = grad.index_select(-2, self.features.to(grad.device))
        return grad


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


def select_matrices(model: nn.Module, layers: str | Sequence[int], projections: Sequence[str]) -> list[Matrix]:
    """The selected logical weight matrices (weights only, never biases), fused ones as row blocks."""
    parts = decoder_parts(model)
    out = []
    for i in resolve_layers(layers, len(parts.layers)):
        for name in expand_projections(projections, parts.layout):
            proj = projection(parts, parts.layers[i], name)
            shared = proj.shared
            also = () if shared is None else (Matrix(f"layers.{i}.{name}.shared", shared.weight, None, False),)
            out.append(Matrix(f"layers.{i}.{name}", proj.weight, proj.features, proj.transposed, proj.experts, also))
    return out


def select_weights(
    model: nn.Module, layers: str | Sequence[int], projections: Sequence[str]
) -> list[tuple[str, nn.Parameter]]:
    """``(name, stored parameter)`` of each selected matrix; for a fused family the parameter is the fused one.

    Use :func:`select_matrices` to read a fused matrix's own gradient block.
    """
    return [(m.name, m.weight) for m in select_matrices(model, layers, projections)]


def unique_weights(matrices: Sequence[Matrix]) -> list[nn.Parameter]:
    """The distinct stored parameters behind ``matrices`` (a fused qkv weight once), in first-seen order."""
    seen: dict[int, nn.Parameter] = {}
    for m in matrices:
        for block in (m, *m.also):
            seen.setdefault(id(block.weight), block.weight)
    return list(seen.values())
