"""Per-family layouts: where each decoder family keeps its layers, attention/MLP matrices and unembedding.

The strength code speaks of LOGICAL matrices -- ``q``, ``k``, ``v``, ``o`` and the MLP's ``gate``, ``up``,
``down`` -- each a ``[d_out, d_in]`` map. A :class:`FamilyLayout` says, for one family, which module holds
each one and, for a FUSED module, which of its output features belong to it:

==========  ================================  ==================================================================
family      attention matrices                notes read from ``transformers/models/<family>/modeling_*.py``
==========  ================================  ==================================================================
llama       ``self_attn.{q,k,v,o}_proj``      RoPE after the projections
mistral     as llama                          ``config.sliding_window`` applies to every layer
qwen2       as llama                          q/k/v biases; per-layer sliding window (``layer_types``)
qwen3       as llama                          RMSNorm over each HEAD of q and k, after the projection
gemma       as llama                          embeddings scaled by ``sqrt(d)``; ``(1 + w)`` RMSNorms
gemma2      as llama                          attention-score AND final-logit tanh soft-capping; post-norms
gemma3      as llama                          per-head q/k norms; local layers: own RoPE base + window
olmo2       as llama                          RMSNorm over the WHOLE q and k vectors; post-norms
granite     as llama                          embedding/residual/attention multipliers; logits / scaling
phi3        fused ``self_attn.qkv_proj``      rows ``[Q | K | V]``; MLP fused ``gate_up_proj`` = ``[gate | up]``
gpt2        fused Conv1D ``attn.c_attn``      weight stored ``[in, out]``; columns ``[Q | K | V]``; no RoPE
gpt_neox    fused ``query_key_value``         INTERLEAVED per head: rows ``[q_h | k_h | v_h]`` for each h
qwen3_moe   as qwen3                          MoE MLP: ``mlp.experts.{gate_up,down}_proj`` ``[E, out, in]``
mixtral     as mistral                        MoE MLP as qwen3_moe (``gate_up`` rows ``[gate | up]``)
olmoe       as olmo2                          MoE MLP as qwen3_moe
gpt_oss     as llama, + ``sinks``             MoE stored ``[E, in, out]``, gate/up INTERLEAVED columns, biases;
                                              per-head sink logit; alternating sliding windows; RoPE per pair
deepseek_v3 MLA: ``q_b_proj`` (or ``q_proj``),  Q = q_b_proj; K, V = the k_nope / v rows of ``kv_b_proj`` per
            ``kv_b_proj``, ``o_proj``         head ``[k_h | v_h]``; MoE as qwen3_moe + an always-on shared expert
==========  ================================  ==================================================================

Mixture of experts (``Slot.experts``): an expert stack ``W [E, out, in]`` is ONE logical matrix, the
block-diagonal ``diag(W_1, ..., W_E)`` -- what the layer computes on the routed copies of its input. Its measure is
that of the block diagonal: nuclear and l1 sum over the experts, Frobenius is the root of the summed squares. A
last-layer token's gradient is nonzero only on the experts it was routed to (the router's weights do not depend
on the experts'), so the strength is over those. DeepSeek-V3's shared expert (``Slot.shared``) is one more block
of the same matrix (an expert every token is routed to with weight 1). The router is not measured. Layers an MoE
model keeps dense (Qwen3-MoE ``mlp_only_layers``, DeepSeek ``first_k_dense_replace``) use ``Slot.alt``.

Multi-head latent attention (DeepSeek-V3, ``FamilyLayout.mla``): q is ``q_b_proj(norm(q_a_proj(x)))`` (or
``q_proj(x)``), the keys' no-RoPE part and the values come from ``kv_b_proj`` on the normed latent ``c_s`` (rows
``[k_nope_h | v_h]`` per head), the keys' RoPE part from ``kv_a_proj_with_mqa`` (shared by all heads). Q, K, V, O
are q_b_proj (or q_proj), kv_b_proj's K rows, its V rows, and o_proj; ``q_a_proj`` and ``kv_a_proj_with_mqa``
(low-rank down-projections) are not measured.

GPT-NeoX really is interleaved: its forward views the fused output as ``[..., heads, 3 * head_dim]`` and
chunks the last axis, so Q's rows are ``{h * 3 hd + i : i < hd}`` -- not the first third. A fused matrix's
gradient ``dz/dW`` is the full fused gradient restricted to those rows (:meth:`Matrix.gradient`).

The "raw logit" is the logit the model OUTPUTS (``model(...).logits``): after Gemma 2/3's final soft-capping
``c * tanh(l / c)`` and after Granite's division by ``logits_scaling`` -- :attr:`DecoderParts.logit_map`.

A model of no listed family gets a GENERIC layout (``loop``, ``vmap`` and ``sketch`` only) when
``get_decoder()`` has a layer list whose attention holds separate ``nn.Linear`` q/k/v/o projections under
common names; its logits are then checked against the model's own forward on every call
(``strength._run``). Otherwise a ``ValueError`` names the model class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")

Features = Callable[[object], Tensor]  # config -> output-feature indices of one matrix inside a fused module


@dataclass(frozen=True)
class Slot:
    """One logical matrix: ``path`` from the decoder layer, and its output features if the module is fused."""

    path: tuple[str, ...]
    features: Features | None = None
    param: str = "weight"
    """The module's parameter holding the matrix (an experts module: ``gate_up_proj`` / ``down_proj``)."""
    experts: bool = False
    """The parameter is a stack of experts ``[E, out, in]`` (``[E, in, out]`` if the layout is ``transposed``)."""
    alt: tuple[str, ...] | None = None
    """The path where ``path`` is absent in a layer (an MoE model's dense layers; DeepSeek's q_proj without q-LoRA)."""
    alt_features: Features | None = None
    """The output features at ``alt`` (None: all)."""
    shared: tuple[str, ...] | None = None
    """An always-on shared expert's ``nn.Linear`` of the same role: one more block of this matrix (DeepSeek-V3)."""


@dataclass(frozen=True)
class FamilyLayout:
    """Where one family keeps what the strength code needs (module docstring)."""

    name: str
    classes: tuple[str, ...]
    """``*ForCausalLM`` class names (matched anywhere in the model's MRO)."""
    slots: dict[str, Slot]
    base: str = "model"
    """Attribute of the causal LM holding the decoder (its output: the final-normed hidden states)."""
    layers: str = "layers"
    unembed: str = "lm_head"
    attention: str = "self_attn"
    final_norm: str | None = "norm"
    """Attribute of the decoder holding the final norm (its input is the residual stream ``h_t``); ``None``: none."""
    conv1d: bool = False
    """Weights stored ``[in, out]`` (GPT-2's ``Conv1D``); gradients are transposed to ``[out, in]``."""
    qk_norm: str | None = None
    """``"head"``: ``q_norm``/``k_norm`` over each head (Qwen3, Gemma 3); ``"flat"``: over the whole vector."""
    rope: bool = True
    window_from_config: bool = False
    """Every layer uses ``config.sliding_window`` (Mistral, Phi-3) instead of the attention's own attribute."""
    onepass: str | None = None
    """``None``: the onepass closed forms apply; else why not (the error message)."""
    experts_transposed: bool = False
    """Expert stacks stored ``[E, in, out]`` (gpt-oss); gradients are transposed to ``[E, out, in]``."""
    rope_pairs: bool = False
    """The rotary module returns one cos/sin per rotated PAIR (gpt-oss): duplicated to the ``rotate_half`` form."""
    mla: bool = False
    """Multi-head latent attention (DeepSeek-V3): K and V are row blocks of ``kv_b_proj`` (module docstring)."""
    beyond_dense: str | None = None
    """What the family has beyond a dense pre-norm decoder (experts, sinks, MLA): why fast paths may refuse it."""
    logit_map: Callable[[object], Callable[[Tensor], Tensor]] = field(default=lambda config: _identity)

    @property
    def mlp_names(self) -> tuple[str, ...]:
        """The MLP matrices this family has (GPT-2 / GPT-NeoX: no gate)."""
        return tuple(n for n in MLP_PROJECTIONS if n in self.slots)


def _identity(x: Tensor) -> Tensor:
    return x


def _softcap_logits(config: object) -> Callable[[Tensor], Tensor]:
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return _identity
    return lambda x: torch.tanh(x / cap) * cap


def _granite_logits(config: object) -> Callable[[Tensor], Tensor]:
    scale = config.logits_scaling
    return lambda x: x / scale


def head_counts(config: object) -> tuple[int, int, int]:
    """``(query heads, kv heads, head_dim)`` from a config (GPT-2 / GPT-NeoX: no GQA, no ``head_dim``)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _span(start: Callable[[object], int], stop: Callable[[object], int]) -> Features:
    return lambda config: torch.arange(start(config), stop(config))


def _q_width(c: object) -> int:
    heads, _, hd = head_counts(c)
    return heads * hd


def _kv_width(c: object) -> int:
    _, kv, hd = head_counts(c)
    return kv * hd


def _neox_rows(part: int) -> Features:
    """GPT-NeoX's fused rows of ``part`` (0 = q, 1 = k, 2 = v): head ``h`` owns rows ``[3h hd, 3(h+1) hd)``."""

    def rows(config: object) -> Tensor:
        heads, _, hd = head_counts(config)
        return (torch.arange(heads)[:, None] * 3 * hd + part * hd + torch.arange(hd)[None, :]).flatten()

    return rows


def _moe_size(c: object) -> int:
    return c.moe_intermediate_size


def _intermediate(c: object) -> int:
    return c.intermediate_size


def _separate(attn: str = "self_attn", mlp: bool = True) -> dict[str, Slot]:
    slots = {n: Slot((attn, f"{n}_proj")) for n in ATTENTION_PROJECTIONS}
    if mlp:
        slots.update({n: Slot(("mlp", f"{n}_proj")) for n in MLP_PROJECTIONS})
    return slots


_PHI3 = {
    "q": Slot(("self_attn", "qkv_proj"), _span(lambda c: 0, _q_width)),
    "k": Slot(("self_attn", "qkv_proj"), _span(_q_width, lambda c: _q_width(c) + _kv_width(c))),
    "v": Slot(("self_attn", "qkv_proj"), _span(lambda c: _q_width(c) + _kv_width(c),
                                               lambda c: _q_width(c) + 2 * _kv_width(c))),
    "o": Slot(("self_attn", "o_proj")),
    "gate": Slot(("mlp", "gate_up_proj"), _span(lambda c: 0, lambda c: c.intermediate_size)),
    "up": Slot(("mlp", "gate_up_proj"), _span(lambda c: c.intermediate_size, lambda c: 2 * c.intermediate_size)),
    "down": Slot(("mlp", "down_proj")),
}  # fmt: skip
_GPT2 = {
    "q": Slot(("attn", "c_attn"), _span(lambda c: 0, lambda c: c.hidden_size)),
    "k": Slot(("attn", "c_attn"), _span(lambda c: c.hidden_size, lambda c: 2 * c.hidden_size)),
    "v": Slot(("attn", "c_attn"), _span(lambda c: 2 * c.hidden_size, lambda c: 3 * c.hidden_size)),
    "o": Slot(("attn", "c_proj")),
    "up": Slot(("mlp", "c_fc")),
    "down": Slot(("mlp", "c_proj")),
}


def _halves(part: int, size: Callable[[object], int]) -> Features:
    """Rows ``[gate | up]`` of a concatenated expert ``gate_up_proj``: ``part`` 0 = gate, 1 = up."""
    return lambda config: torch.arange(part * size(config), (part + 1) * size(config))


def _moe(size: Callable[[object], int], dense: str = "mlp", shared: bool = False) -> dict[str, Slot]:
    """MoE MLP slots: concatenated ``gate_up_proj [E, 2I, d]`` and ``down_proj [E, d, I]``; ``alt`` dense layers."""
    experts = ("mlp", "experts")
    return {
        "gate": Slot(experts, _halves(0, size), "gate_up_proj", True, (dense, "gate_proj"),
                     shared=("mlp", "shared_experts", "gate_proj") if shared else None),
        "up": Slot(experts, _halves(1, size), "gate_up_proj", True, (dense, "up_proj"),
                   shared=("mlp", "shared_experts", "up_proj") if shared else None),
        "down": Slot(experts, None, "down_proj", True, (dense, "down_proj"),
                     shared=("mlp", "shared_experts", "down_proj") if shared else None),
    }  # fmt: skip


def _gpt_oss_gate_up(part: int) -> Features:
    """gpt-oss's INTERLEAVED expert ``gate_up_proj``: ``gate = [..., ::2]``, ``up = [..., 1::2]``."""
    return lambda config: torch.arange(part, 2 * config.intermediate_size, 2)


_GPT_OSS = {
    **_separate(mlp=False),
    "gate": Slot(("mlp", "experts"), _gpt_oss_gate_up(0), "gate_up_proj", True),
    "up": Slot(("mlp", "experts"), _gpt_oss_gate_up(1), "gate_up_proj", True),
    "down": Slot(("mlp", "experts"), None, "down_proj", True),
}


def _mla_rows(part: int) -> Features:
    """DeepSeek-V3 ``kv_b_proj`` rows of ``part`` (0 = k_nope, 1 = v): head ``h`` owns ``[k_nope_h | v_h]``."""

    def rows(config: object) -> Tensor:
        nope, hv = config.qk_nope_head_dim, config.v_head_dim
        start, width = (0, nope) if part == 0 else (nope, hv)
        heads = torch.arange(config.num_attention_heads)[:, None] * (nope + hv)
        return (heads + start + torch.arange(width)[None, :]).flatten()

    return rows


_DEEPSEEK_V3 = {
    "q": Slot(("self_attn", "q_b_proj"), alt=("self_attn", "q_proj")),
    "k": Slot(("self_attn", "kv_b_proj"), _mla_rows(0)),
    "v": Slot(("self_attn", "kv_b_proj"), _mla_rows(1)),
    "o": Slot(("self_attn", "o_proj")),
    **_moe(lambda c: c.moe_intermediate_size, shared=True),
}
_NEOX = {
    "q": Slot(("attention", "query_key_value"), _neox_rows(0)),
    "k": Slot(("attention", "query_key_value"), _neox_rows(1)),
    "v": Slot(("attention", "query_key_value"), _neox_rows(2)),
    "o": Slot(("attention", "dense")),
    "up": Slot(("mlp", "dense_h_to_4h")),
    "down": Slot(("mlp", "dense_4h_to_h")),
}

LAYOUTS: tuple[FamilyLayout, ...] = (
    FamilyLayout("llama", ("LlamaForCausalLM",), _separate()),
    FamilyLayout("mistral", ("MistralForCausalLM",), _separate(), window_from_config=True),
    FamilyLayout("qwen2", ("Qwen2ForCausalLM",), _separate()),
    FamilyLayout("qwen3", ("Qwen3ForCausalLM",), _separate(), qk_norm="head"),
    FamilyLayout("gemma", ("GemmaForCausalLM",), _separate()),
    FamilyLayout("gemma2", ("Gemma2ForCausalLM",), _separate(), logit_map=_softcap_logits),
    FamilyLayout("gemma3", ("Gemma3ForCausalLM",), _separate(), qk_norm="head", logit_map=_softcap_logits),
    FamilyLayout("olmo2", ("Olmo2ForCausalLM",), _separate(), qk_norm="flat"),
    FamilyLayout("granite", ("GraniteForCausalLM",), _separate(), logit_map=_granite_logits),
    FamilyLayout("phi3", ("Phi3ForCausalLM",), _PHI3, window_from_config=True),
    FamilyLayout("gpt2", ("GPT2LMHeadModel",), _GPT2, base="transformer", layers="h", attention="attn",
                 final_norm="ln_f", conv1d=True, rope=False),
    FamilyLayout("gpt_neox", ("GPTNeoXForCausalLM",), _NEOX, base="gpt_neox", attention="attention",
                 final_norm="final_layer_norm"),
    FamilyLayout("qwen3_moe", ("Qwen3MoeForCausalLM",), {**_separate(mlp=False), **_moe(_moe_size)},
                 qk_norm="head", beyond_dense="a mixture-of-experts MLP"),
    FamilyLayout("mixtral", ("MixtralForCausalLM",), {**_separate(mlp=False), **_moe(_intermediate)},
                 window_from_config=True, beyond_dense="a mixture-of-experts MLP"),
    FamilyLayout("olmoe", ("OlmoeForCausalLM",), {**_separate(mlp=False), **_moe(_intermediate)}, qk_norm="flat",
                 beyond_dense="a mixture-of-experts MLP"),
    FamilyLayout("gpt_oss", ("GptOssForCausalLM",), _GPT_OSS, experts_transposed=True, rope_pairs=True,
                 beyond_dense="attention sinks and a mixture-of-experts MLP"),
    FamilyLayout("deepseek_v3", ("DeepseekV3ForCausalLM",), _DEEPSEEK_V3, mla=True,
                 beyond_dense="multi-head latent attention and a mixture-of-experts MLP"),
)  # fmt: skip

# Names a generic layout looks for, in order (first found wins).
_GENERIC_ATTENTION = ("self_attn", "attn", "attention", "self_attention")
_GENERIC_NAMES = {
    "q": ("q_proj", "query", "q", "wq"),
    "k": ("k_proj", "key", "k", "wk"),
    "v": ("v_proj", "value", "v", "wv"),
    "o": ("o_proj", "out_proj", "dense", "wo"),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "fc1", "w3"),
    "down": ("down_proj", "fc2", "w2"),
}
_GENERIC_MLP = ("mlp", "feed_forward", "ffn")
_GENERIC_LAYERS = ("layers", "h", "blocks")
_GENERIC_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm")


def supported_families() -> tuple[str, ...]:
    return tuple(layout.name for layout in LAYOUTS)


def find_layout(model: nn.Module) -> FamilyLayout:
    """The listed family's layout, else a generic one (loop/vmap/sketch), else ValueError naming the class."""
    names = [cls.__name__ for cls in type(model).__mro__]
    for layout in LAYOUTS:
        if any(n in layout.classes for n in names):
            return layout
    return _generic_layout(model)


def _linear_child(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if isinstance(getattr(module, c, None), nn.Linear)), None)


def _generic_layout(model: nn.Module) -> FamilyLayout:
    cls = type(model).__name__
    listed = ", ".join(c for layout in LAYOUTS for c in layout.classes)

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"gradient strength: {cls} is not a listed family ({listed}) and {why}. "
            "Add its layout to corrpo/models/families.py to support it."
        )

    get_decoder = getattr(model, "get_decoder", None)
    base = get_decoder() if callable(get_decoder) else None
    base_attr = next((n for n, m in model.named_modules() if m is base and n), None) if base is not None else None
    if base_attr is None:
        raise refuse("has no get_decoder() submodule")
    layers_attr = next((n for n in _GENERIC_LAYERS if isinstance(getattr(base, n, None), nn.ModuleList)), None)
    if layers_attr is None:
        raise refuse("its decoder has no layer list")
    layer = getattr(base, layers_attr)[0]
    attn = next((n for n in _GENERIC_ATTENTION if isinstance(getattr(layer, n, None), nn.Module)), None)
    if attn is None:
        raise refuse("its decoder layers have no attention module")
    slots: dict[str, Slot] = {}
    for name in ATTENTION_PROJECTIONS:
        child = _linear_child(getattr(layer, attn), _GENERIC_NAMES[name])
        if child is None:
            raise refuse(f"no separate nn.Linear {name} projection was found in its attention (fused?)")
        slots[name] = Slot((attn, child))
    mlp = next((n for n in _GENERIC_MLP if isinstance(getattr(layer, n, None), nn.Module)), None)
    if mlp is not None:
        for name in MLP_PROJECTIONS:
            child = _linear_child(getattr(layer, mlp), _GENERIC_NAMES[name])
            if child is not None:
                slots[name] = Slot((mlp, child))
    unembed = model.get_output_embeddings()
    unembed_attr = next((n for n, m in model.named_modules() if m is unembed and n), None)
    if not isinstance(unembed, nn.Linear) or unembed_attr is None:
        raise refuse("its output embedding is not an nn.Linear")
    logit_map = _granite_logits if getattr(model.config, "logits_scaling", None) else _softcap_logits
    return FamilyLayout(
        name=f"generic:{cls}",
        classes=(cls,),
        slots=slots,
        base=base_attr,
        layers=layers_attr,
        unembed=unembed_attr,
        attention=attn,
        final_norm=next((n for n in _GENERIC_FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None),
        onepass=f"{cls} has a generic layout (not a listed family): its onepass closed forms are not derived",
        logit_map=logit_map,
    )
