"""Tiny random configs of every decoder family the strength code supports (``tiny-<family>`` policies).

Each is the family's own transformers config class, sized by :class:`corrpo.models.loading.TinyArchitecture`, with
the few defaults that would break a 2-layer, 32-64 wide model overridden: ``head_dim`` (Gemma/Qwen3 default
to 128-256) and ``pad_token_id`` (Phi-3 defaults to 32000). Everything else (soft-capping, multipliers,
partial rotary, window sizes) keeps the family default unless ``overrides`` says otherwise -- the strength
tests shrink those to values that bite on a tiny model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

_LLAMA_LIKE = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
    "gemma3": Gemma3TextConfig,
    "olmo2": Olmo2Config,
    "granite": GraniteConfig,
    "phi3": Phi3Config,
}
# Mixture-of-experts and MLA families: 4 experts, 2 per token, experts half the MLP width (Qwen3-MoE, DeepSeek-V3:
# ``moe_intermediate_size``); their own keys for it, and DeepSeek's latent ranks and head split from the width.
_MOE = {
    "qwen3_moe": Qwen3MoeConfig,
    "mixtral": MixtralConfig,
    "olmoe": OlmoeConfig,
    "gpt_oss": GptOssConfig,
    "deepseek_v3": DeepseekV3Config,
}
DENSE_FAMILY_NAMES = (*_LLAMA_LIKE, "gpt2", "gpt_neox")
MOE_FAMILY_NAMES = tuple(_MOE)
TINY_FAMILY_NAMES = (*DENSE_FAMILY_NAMES, *MOE_FAMILY_NAMES)


def _moe_kwargs(family: str, arch: Any) -> dict[str, Any]:
    """The experts (and DeepSeek's latent attention) of a tiny ``family`` model, sized from ``arch``."""
    hd = arch.hidden_size // arch.num_attention_heads
    experts = dict(num_experts_per_tok=2)
    if family in ("qwen3_moe", "olmoe"):
        experts.update(num_experts=4)
    else:
        experts.update(num_local_experts=4)
    if family in ("qwen3_moe", "deepseek_v3"):
        experts.update(moe_intermediate_size=arch.intermediate_size // 2)
    else:
        experts.update(intermediate_size=arch.intermediate_size // 2)
    if family in ("gpt_oss", "deepseek_v3"):  # their defaults are YaRN over 4k positions: plain RoPE here
        experts.update(rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta})
    if family == "deepseek_v3":
        del experts["num_local_experts"]
        experts.update(n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                       q_lora_rank=arch.hidden_size // 2, kv_lora_rank=arch.hidden_size // 2, qk_nope_head_dim=hd,
                       qk_rope_head_dim=max(2, hd // 2), v_head_dim=hd, num_key_value_heads=arch.num_attention_heads,
                       head_dim=None)  # fmt: skip
    return experts


def tiny_config(
    family: str,
    vocab_size: int,
    arch: Any,
    pad_token_id: int,
    bos_token_id: int,
    eos_token_id: int,
    **overrides: Any,
) -> PretrainedConfig:
    """The config of a tiny random ``family`` model (one of :data:`TINY_FAMILY_NAMES`); ``arch``: a TinyArchitecture."""
    special = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if family == "gpt2":
        kwargs = dict(
            vocab_size=vocab_size,
            n_embd=arch.hidden_size,
            n_layer=arch.num_hidden_layers,
            n_head=arch.num_attention_heads,
            n_inner=arch.intermediate_size,
            n_positions=arch.max_position_embeddings,
            tie_word_embeddings=arch.tie_word_embeddings,
            **special,
        )
        return GPT2Config(**{**kwargs, **overrides})
    common = dict(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings,
        **special,
    )
    if family == "gpt_neox":
        return GPTNeoXConfig(**{**common, **overrides})
    if family not in _LLAMA_LIKE and family not in _MOE:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILY_NAMES}")
    common.update(num_key_value_heads=arch.num_key_value_heads, head_dim=arch.hidden_size // arch.num_attention_heads)
    if family in _MOE:
        common.pop("rope_theta")
        common.update(_moe_kwargs(family, arch))
        common = {k: v for k, v in common.items() if v is not None}
        return _MOE[family](**{**common, **overrides})
    return _LLAMA_LIKE[family](**{**common, **overrides})


# Family defaults that would not bite on a 12-64 token, 32-64 wide model, shrunk so that they do: sliding
# windows shorter than the sequence, soft-caps near the score scale, Granite's multipliers away from 1,
# partial RoPE on Phi-3. Used by the strength tests and benchmarks/families.py.
BITING_OVERRIDES: dict[str, dict[str, Any]] = {
    "mistral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, layer_types=["full_attention", "sliding_attention"]),
    "gemma2": dict(attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
    "gemma3": dict(sliding_window=5, final_logit_softcapping=2.0),
    "granite": dict(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=3.0),
    "phi3": dict(sliding_window=5, partial_rotary_factor=0.5),
    "qwen3_moe": dict(mlp_only_layers=[0]),  # layer 0 dense: the dense MLP of an MoE model is read too
    "mixtral": dict(sliding_window=5),
    "gpt_oss": dict(sliding_window=5, layer_types=["full_attention", "sliding_attention"]),
}


def random_family_model(family: str, vocab_size: int, arch: Any, seed: int = 0) -> PreTrainedModel:
    """A random fp32 eval-mode ``family`` model with :data:`BITING_OVERRIDES`, for exactness checks.

    Initialised with std 0.2 (not 0.02) so attention is far from uniform and soft-caps saturate, and every norm
    weight perturbed by ``0.3 * N(0, 1)`` so a mix-up of normed and raw activations would show.
    """
    config = tiny_config(family, vocab_size, arch, 0, 1, 2, initializer_range=0.2, **BITING_OVERRIDES.get(family, {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or ".ln_" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return model
