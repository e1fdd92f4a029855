"""A lean decode loop for Llama-like policies: HF ``generate``'s outputs with far fewer ops per decoded token.

Why: on a CPU at the embedded default's shapes (batch 128, hidden 128) one HF decode step costs ~6 ms
against a ~1 ms matmul floor -- it is bound by the NUMBER of small ops per token (module calls, the dynamic
cache's concatenation, the mask rebuilt every step, rotary recomputed per layer), not by FLOPs. A static cache,
``torch.compile`` and a plain loop over the HF model's forward did not help. :class:`DecodeLoopGenerator`
instead runs each decode step with torch ops directly on the HF module's weights:

* **prefill once per prompt**: the ``B`` prompts go through the HF model's own forward once (not ``B * G``
  times); its keys/values are copied ``G`` times into a preallocated ``[N, (P + L) * H_kv, d_head]`` cache per
  layer (key ``p * H_kv + h``: head ``h`` at position ``p``), written in place at each step (no concatenation);
* **fused projections**: one matmul for ``[W_q; W_k; W_v]`` and one for ``[W_gate; W_up]`` per layer (the
  output rows are the same dot products, so the values are the same; the tests check bit-identity);
* **rotary once**: ``cos``/``sin`` for every decode position from the model's own rotary module, once per
  call; q and k are rotated together as ``x * cos + swap_halves(x) * sin_signed`` where ``sin_signed`` is
  ``[-sin_1 | sin_2]`` -- elementwise the same products and sums as HF's ``rotate_half``;
* **the mask built once**: decoding one token attends to every real prompt token and every generated one,
  so the additive bias is the prompt's padding mask followed by zeros, built once and sliced per step; every
  head of a row goes into one batched matrix product, the other key/value heads' keys masked
  (:func:`cached_attention`);
* ``F.rms_norm`` (one op; the same values as the HF norm module in fp32, the only dtype the loop takes);
* **finished rows dropped**: once at most ``compact_below`` (7/8) of the computed rows are unfinished, the
  finished ones leave the batch (their cache, bias and rotary rows with them), so a row costs nothing after its
  eos; HF computes every row to the last step. The loop stops as soon as every row has emitted eos; rows that
  finished get the pad token, as HF writes them.

Sampling is :func:`next_token_probs` (HF's temperature and top-p warpers) then :func:`draw_tokens`, which is
``torch.multinomial`` as HF's ``_sample`` calls it on the whole batch, with the same random numbers, for the
rows still computed; greedy is ``argmax`` of the fp32 logits. So greedy outputs equal HF ``generate``'s and samples
come from the same distribution; ``tests/test_fast_decode.py`` checks both on several families. Forward hooks
on the policy's submodules do not run during decoding (the prefill runs them).

Supported: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` in fp32 with SDPA attention, plain ``nn.Linear`` projections
(no LoRA wrappers), a stateless RoPE type, no sliding window shorter than prompt + completion and no
``generation_config`` setting that changes HF's logits (:data:`NEUTRAL_GENERATION_SETTINGS`: a repetition
penalty, a minimum length, ...). For any other
model :meth:`DecodeLoopGenerator.generate` calls its fallback (:class:`corrpo.generation.rollout.HFGenerator`) and keeps
the reason in :attr:`DecodeLoopGenerator.fallback_reason`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from corrpo.generation.rollout import Generator, HFGenerator, Rollout, SamplingConfig, rollout_from_sequences
from corrpo.models.forward import eval_mode, position_ids_from_mask
from corrpo.models.sharding import is_sharded

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
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


def next_token_probs(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """``softmax(logits / T)`` restricted to the nucleus, as HF's ``TemperatureLogitsWarper`` then
    ``TopPLogitsWarper`` (``min_tokens_to_keep=1``) then softmax: sort ascending, drop the tokens whose
    cumulative probability is ``<= 1 - top_p`` (never the most likely one), renormalise. ``[N, V]`` -> ``[N, V]``."""
    scores = logits if temperature == 1.0 else logits / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return scores.softmax(dim=-1)


def unsupported_reason(model: PreTrainedModel, total_length: int) -> str | None:
    """Why :class:`DecodeLoopGenerator` cannot reproduce ``model.generate`` for ``model`` (``None``: it can)."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        return f"model_type {family!r} is not one of {SUPPORTED_FAMILIES}"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attn_implementation {config._attn_implementation!r} (the lean loop mirrors the sdpa path)"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATELESS_ROPE:
        return f"rope_type {rope_type!r} updates its frequencies with the sequence length"
    if getattr(config, "pretraining_tp", 1) > 1:
        return "pretraining_tp > 1"
    generation_config = getattr(model, "generation_config", None)
    for key, neutral in NEUTRAL_GENERATION_SETTINGS.items():
        value = getattr(generation_config, key, None)
        if value not in neutral:
            return f"generation_config.{key} = {value!r} (HF generate applies it; the lean loop does not)"
    if is_sharded(model):
        return "the policy is FSDP2-sharded (its weights are per-rank shards; HF generate gathers them per layer)"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return f"{type(model).__name__} has no model.layers / lm_head.Linear"
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear for m in linears):
            return f"layer {i} has projections that are not plain nn.Linear (adapters?)"
        window = config.sliding_window if family == "mistral" else getattr(attn, "sliding_window", None)
        if window is not None and window < total_length:
            return f"layer {i} has a sliding window ({window}) shorter than prompt + completion ({total_length})"
    if model.lm_head.weight.dtype != torch.float32:
        return f"dtype {model.lm_head.weight.dtype} (F.rms_norm equals the HF norm in fp32 only)"
    return None


@dataclass
class _Layer:
    """One decoder layer's weights for the decode step (fused where the rows are independent)."""

    norm1: nn.Module
    qkv_weight: Tensor
    qkv_bias: Tensor | None
    qk_norm_eps: float
    qk_norm_weight: Tensor | None
    """Qwen3: ``[H_q + H_kv, d_head]`` the q_norm weight on each query head, then k_norm's on each key head."""
    o_proj: nn.Linear
    norm2: nn.Module
    gate_up_weight: Tensor
    gate_up_bias: Tensor | None
    down_proj: nn.Linear
    act: nn.Module


def _cat_bias(*linears: nn.Linear) -> Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


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
        self.fallback_reason = unsupported_reason(model, prompt_ids.shape[1] + sampling.max_new_tokens)
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

    # ------------------------------------------------------------------------------------------ internals
    @staticmethod
    def _layers(model: PreTrainedModel) -> list[_Layer]:
        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qk_norm, qk_eps = None, 0.0
            if hasattr(attn, "q_norm"):
                heads_q = model.config.num_attention_heads
                heads_kv = model.config.num_key_value_heads
                qk_norm = torch.cat([attn.q_norm.weight.expand(heads_q, -1), attn.k_norm.weight.expand(heads_kv, -1)])
                qk_eps = attn.q_norm.variance_epsilon
            layers.append(
                _Layer(
                    norm1=layer.input_layernorm,
                    qkv_weight=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    qkv_bias=_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj),
                    qk_norm_eps=qk_eps,
                    qk_norm_weight=qk_norm,
                    o_proj=attn.o_proj,
                    norm2=layer.post_attention_layernorm,
                    gate_up_weight=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    gate_up_bias=_cat_bias(mlp.gate_proj, mlp.up_proj),
                    down_proj=mlp.down_proj,
                    act=mlp.act_fn,
                )
            )
        return layers

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
        config = model.config
        B, P = prompt_ids.shape
        N, L = B * G, sampling.max_new_tokens
        heads_q, heads_kv = config.num_attention_heads, config.num_key_value_heads
        d_head = getattr(config, "head_dim", None) or config.hidden_size // heads_q
        n_rep = heads_q // heads_kv
        device = prompt_ids.device

        # prefill: the HF model's own forward on the B prompts, positions as generate() makes them
        prompt_positions = position_ids_from_mask(prompt_mask)
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=prompt_positions,
            use_cache=True,
            logits_to_keep=1,
        )
        dtype = out.cache.layers[0].keys.dtype
        # one cache per row and layer, [N, (P + L) * H_kv, d] (key p * H_kv + h: head h at position p); its first
        # P * H_kv keys are the prompt's, copied to each of the G samples of a prompt
        width = (P + L) * heads_kv
        caches = []
        for c in out.cache.layers:
            kv = torch.empty(2, N, width, d_head, dtype=dtype, device=device)
            kv[0, :, : P * heads_kv] = c.keys.transpose(1, 2).reshape(B, P * heads_kv, d_head).repeat_interleave(G, 0)
            kv[1, :, : P * heads_kv] = c.values.transpose(1, 2).reshape(B, P * heads_kv, d_head).repeat_interleave(G, 0)
            caches.append(kv)
        logits = out.logits[:, -1, :].float().repeat_interleave(G, dim=0)
        del out

        # everything a decode step needs, built once
        layers = self._layers(model)
        embed = model.model.embed_tokens.weight
        final_norm, lm_head = model.model.norm, model.lm_head
        kv_head_of_query = torch.arange(heads_q, device=device) // n_rep
        same_head = kv_head_of_query[:, None] == torch.arange(heads_kv, device=device)  # [H_q, H_kv]
        real = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(B, L, dtype=torch.bool)], 1)  # [B, P + L]
        allowed = real[:, None, :, None] & same_head[None, :, None, :]  # [B, H_q, P + L, H_kv]
        bias = _additive(allowed.flatten(2).repeat_interleave(G, 0), dtype)  # [N, H_q, (P + L) * H_kv]
        positions = prompt_mask.sum(-1, keepdim=True).repeat_interleave(G, 0) + torch.arange(L, device=device)
        cos, sin = model.model.rotary_emb(embed[:1], positions)  # [N, L, d_head], positions n_real + t
        half = d_head // 2
        sin_signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        cos = cos.transpose(0, 1).unsqueeze(2).contiguous()  # [L, N, 1, d_head]
        sin_signed = sin_signed.transpose(0, 1).unsqueeze(2).contiguous()
        heads_qk = heads_q + heads_kv
        scale = d_head**-0.5

        sequences = torch.full((N, P + L), pad_token_id, dtype=prompt_ids.dtype, device=device)
        sequences[:, :P] = prompt_ids.repeat_interleave(G, dim=0)
        rows = torch.arange(N, device=device)  # the rows the decode step still computes (see compact_below)
        finished = torch.zeros(N, dtype=torch.bool, device=device)  # over `rows`
        steps = 0
        for t in range(L):
            tokens = draw_tokens(logits, rows, N, sampling, greedy).masked_fill(finished, pad_token_id)
            sequences[rows, P + t] = tokens
            steps = t + 1
            finished |= tokens == eos_token_id
            done = int(finished.sum())
            if t == L - 1 or done == len(rows):
                break
            filled = (P + t) * heads_kv  # keys before this step's
            if done and len(rows) - done <= self.compact_below * len(rows):
                keep = (~finished).nonzero().squeeze(1)
                rows, finished, tokens = rows[keep], finished[keep], tokens[keep]
                caches = [_compacted(kv, keep, filled) for kv in caches]
                bias, cos, sin_signed = bias[keep], cos[:, keep], sin_signed[:, keep]
            n, seen = len(rows), filled + heads_kv  # keys so far, this step's included
            h = F.embedding(tokens, embed)
            for layer, kv in zip(layers, caches, strict=True):
                x = _rms_norm(layer.norm1, h)
                qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias).view(n, heads_qk + heads_kv, d_head)
                qk = qkv[:, :heads_qk]
                if layer.qk_norm_weight is not None:
                    qk = _head_norm(layer, qk)
                swapped = torch.cat([qk[..., half:], qk[..., :half]], dim=-1)
                qk = qk * cos[t] + swapped * sin_signed[t]
                kv[0, :, filled:seen] = qk[:, heads_q:]
                kv[1, :, filled:seen] = qkv[:, heads_qk:]
                a = cached_attention(qk[:, :heads_q], kv[0, :, :seen], kv[1, :, :seen], bias[:, :, :seen], scale)
                h = h + F.linear(a.reshape(n, heads_q * d_head), layer.o_proj.weight, layer.o_proj.bias)
                x = _rms_norm(layer.norm2, h)
                gate_up = F.linear(x, layer.gate_up_weight, layer.gate_up_bias)
                inner = gate_up.shape[-1] // 2
                x = layer.act(gate_up[:, :inner]) * gate_up[:, inner:]
                h = h + F.linear(x, layer.down_proj.weight, layer.down_proj.bias)
            logits = F.linear(_rms_norm(final_norm, h), lm_head.weight, lm_head.bias).float()
        return sequences[:, : P + steps]


def draw_tokens(logits: Tensor, rows: Tensor, num_rows: int, sampling: SamplingConfig, greedy: bool) -> Tensor:
    """The next token of each row in ``rows`` (``logits``: theirs, ``[len(rows), V]``) out of ``num_rows``.

    Greedy: ``argmax``. Sampled: ``torch.multinomial(probs, 1)`` over all ``num_rows`` rows is, in torch's own
    implementation, ``argmax(probs / q)`` with ``q = empty_like(probs).exponential_(1)`` (the exponential-race
    form of Gumbel-max); drawing ``q`` for every row, then using the rows in ``rows``, consumes the RNG exactly as
    HF's ``_sample`` does on the whole batch (finished rows included), so a seeded run draws the same tokens
    as HF ``generate`` although finished rows are no longer computed. ``tests/test_fast_decode.py`` checks that
    this equals ``torch.multinomial`` bit for bit.
    """
    if greedy:
        return logits.argmax(-1)
    probs = next_token_probs(logits, sampling.temperature, sampling.top_p)
    q = torch.empty((num_rows, probs.shape[1]), dtype=probs.dtype, device=probs.device).exponential_(1)
    return (probs / (q if len(rows) == num_rows else q.index_select(0, rows))).argmax(-1)


def cached_attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float) -> Tensor:
    """One decoded token's attention ``softmax(scale * q . k + bias) @ v`` over its row's cache, all heads at once.

    ``q``: ``[n, H_q, d]``; ``keys``/``values``: ``[n, S * H_kv, d]``, key ``s * H_kv + h`` is head ``h`` at
    position ``s``; ``bias``: ``[n, H_q, S * H_kv]``, 0 where query head ``h_q``'s key/value head is ``h`` and
    position ``s`` is a real token, else ``-inf``. Returns ``[n, H_q, d]``.

    Why this shape: a decode step is dispatch-bound, and batched matmuls cost about a microsecond per batch
    entry, so every head of a row goes into one matrix product (``n`` entries, not ``n * H_kv``); the keys of
    the other heads are masked by the bias (their weight is exactly 0).
    """
    scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), values)


def _compacted(kv: Tensor, keep: Tensor, filled: int) -> Tensor:
    """A ``[2, n, width, d]`` cache with only the rows ``keep``, their first ``filled`` keys copied."""
    out = kv.new_empty(2, len(keep), *kv.shape[2:])
    torch.index_select(kv[:, :, :filled], 1, keep, out=out[:, :, :filled])
    return out


def _additive(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A boolean mask as an additive attention bias: 0 where allowed, ``-inf`` elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, -float("inf"))


def _rms_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """The HF RMSNorm module's output ``w * x / sqrt(mean(x^2) + eps)`` as one op (fp32: the same values)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _head_norm(layer: _Layer, qk: Tensor) -> Tensor:
    """Qwen3's q_norm on each query head and k_norm on each key head, as one normalisation and one product."""
    return F.rms_norm(qk, qk.shape[-1:], None, layer.qk_norm_eps) * layer.qk_norm_weight
