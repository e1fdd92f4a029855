"""Policies and tokenizers: Hugging Face names or folders, or a tiny offline architecture.

``load_policy("Qwen/Qwen2.5-0.5B-Instruct")`` or ``load_policy("/path/to/folder")`` goes through
``AutoModelForCausalLM`` / ``AutoTokenizer``. ``load_policy("tiny-qwen2")`` / ``"tiny-llama"`` (or any
``tiny-<family>`` of :data:`corrpo.models.tiny_families.TINY_FAMILY_NAMES`: mistral, qwen3, gemma, gemma2, gemma3,
olmo2, granite, phi3, gpt2, gpt_neox) builds a small random model of that family from a config, with a
character-level tokenizer built locally by the ``tokenizers`` library: no hub, no download, so the embedded
default and the tests run anywhere. A folder without tokenizer files is an error naming it. Both kinds
round-trip through ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from corrpo.models.lora import is_peft_model, merged_copy, save_adapter
from corrpo.models.tiny_families import TINY_FAMILY_NAMES, tiny_config

TINY_FAMILIES = {f"tiny-{family}": family for family in TINY_FAMILY_NAMES}
# Any of these in a folder means it carries its own tokenizer (fast, BPE vocab, sentencepiece, WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# The reasoning tags are single tokens, as in real reasoning tokenizers: shorter sequences, and the model
# does not have to learn to spell them.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclass
class TinyArchitecture:
    """Size of the tiny model built when ``policy`` is ``tiny-<family>`` (``tiny-qwen2``, ``tiny-llama``, ...)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (GQA when fewer than query heads)."""
    intermediate_size: int = 192
    """MLP width."""
    max_position_embeddings: int = 256
    """Longest sequence (prompt + completion) the model will see."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = True
    """Share the unembedding with the input embedding (False: a separate ``lm_head``, as the search varies)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("tiny.hidden_size must be divisible by tiny.num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("tiny.num_attention_heads must be divisible by tiny.num_key_value_heads")


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over printable ASCII (or ``alphabet``) plus specials and tags.

    Every character is one token, except the four reasoning tags, which are one token each. Unknown
    characters map to ``<unk>``. ``decode`` concatenates (``Fuse`` decoder), so text round-trips exactly.
    """
    chars = alphabet if alphabet is not None else string.printable
    ordered = list(dict.fromkeys([*SPECIAL_TOKENS, *TAG_TOKENS, *chars]))
    vocab = {tok: i for i, tok in enumerate(ordered)}
    tags = "|".join(t.replace("/", "\\/") for t in TAG_TOKENS)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"{tags}|[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_policy(
    family: str, tokenizer: PreTrainedTokenizerBase, arch: TinyArchitecture, seed: int = 0
) -> PreTrainedModel:
    """A random model of ``family`` (``qwen2``, ``llama``, ... :mod:`corrpo.models.tiny_families`) sized by ``arch``."""
    config = tiny_config(
        family, len(tokenizer), arch, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    if family != "gemma2":  # Gemma 2's attention soft-capping has no SDPA kernel: transformers picks eager
        config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_policy(
    policy: str,
    tiny: TinyArchitecture | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the policy and its tokenizer.

    Args:
        policy: ``tiny-qwen2``, ``tiny-llama``, a local folder, or a Hugging Face model name.
        tiny: architecture for the tiny families (ignored otherwise).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``).
    """
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"model.dtype: unknown dtype {dtype!r}")
    if policy in TINY_FAMILIES:
        tokenizer = build_char_tokenizer()
        model = build_tiny_policy(TINY_FAMILIES[policy], tokenizer, tiny or TinyArchitecture(), seed)
        return model.to(torch_dtype), tokenizer
    if policy.startswith("~"):
        policy = str(Path(policy).expanduser())
    if policy.startswith(("/", "./", "../")) and not Path(policy).exists():
        raise ValueError(f"model.policy: no such folder {policy!r}")
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = load_tokenizer(policy)
        model = AutoModelForCausalLM.from_pretrained(policy, **kwargs)
    except OSError as err:
        where = "folder" if Path(policy).exists() else "Hugging Face name (offline? set HF_HUB_OFFLINE=0)"
        raise ValueError(f"model.policy: cannot load {policy!r} as a {where}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Hugging Face's activation (gradient) checkpointing of every decoder layer, non-reentrant: works with frozen
    inputs, LoRA and forward hooks. ``activation_checkpointing_enable`` in transformers >= 5.2 (the old name warns),
    ``gradient_checkpointing_enable`` before; both set ``gradient_checkpointing`` on each layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_tokenizer(name_or_folder: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer``, except for folders saved from a generic fast tokenizer (our char tokenizer).

    transformers 5 picks the tokenizer class from the *model* type for some families (Qwen2), which
    would turn a saved character tokenizer into a byte-level Qwen2 one; honour the folder's own class.
    """
    folder = Path(name_or_folder)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would silently build a one-token tokenizer here: every probe then scores 0 tokens
        raise ValueError(
            f"model.policy: folder {name_or_folder!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer next to the weights (tokenizer.save_pretrained(folder))"
        )
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in GENERIC_TOKENIZER_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(name_or_folder)
    return AutoTokenizer.from_pretrained(name_or_folder)


def export_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the policy and tokenizer as a Hugging Face folder that ``from_pretrained`` loads.

    ``state_dict``: the weights to write instead of ``model``'s own, e.g. the full tensors of an FSDP2-sharded
    policy gathered by :func:`corrpo.models.sharding.full_state_dict` (its config and class are ``model``'s).

    A LoRA policy (``model.lora``, a PEFT model) is saved MERGED, ``W + (alpha / r) B A`` in every adapted
    weight (on a copy: ``model`` keeps its adapters), so the folder is a plain model of the base's class; the
    adapters alone go to ``folder/adapter`` for ``PeftModel.from_pretrained(base, folder / "adapter")``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        save_adapter(model, folder / "adapter")
        model = merged_copy(model)
    if state_dict is not None:
        state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
        # a gathered state dict holds tied weights (embeddings = unembedding) as separate copies: keep the first
        # name of each shared parameter, as save_pretrained does for the model's own
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        for tied in names.values():
            for name in tied[1:]:
                state_dict.pop(name, None)
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return folder
