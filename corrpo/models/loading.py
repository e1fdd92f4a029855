"""Policies and tokenizers: Hugging Face names or folders, or a tiny offline architecture.

``load_policy("Qwen/Qwen2.5-0.5B-Instruct")`` or ``load_policy("/path/to/folder")`` goes through
``AutoModelForCausalLM`` / ``AutoTokenizer``. ``load_policy("tiny-qwen2")`` / ``"tiny-llama"`` (or any
``tiny-<family>`` of :data:`corrpo.models.tiny_families.TINY_FAMILY_NAMES`: mistral, qwen3, gemma, gemma2, gemma3,
olmo2, granite, phi3, gpt2, gpt_neox) builds a small random model of that family from a config, with a
character-level tokenizer built locally by the ``tokenizers`` library (or, with ``tiny.tokenizer: bpe``, a byte-level
BPE tokenizer trained locally on a corpus the caller gives, :mod:`corrpo.models.bpe_tokenizer`): no hub, no download,
so the embedded default and the tests run anywhere. A folder without tokenizer files is an error naming it. Both kinds
round-trip through ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from corrpo.models.bpe_tokenizer import cached_bpe_tokenizer
from corrpo.models.finite import require_finite_fields, require_finite_state, require_finite_weights
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
TOKENIZER_SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
"""The tiny tokenizers' special tokens, as the tokenizer attributes they are set as (ids 0-3 in this order)."""
SPECIAL_TOKENS = tuple(TOKENIZER_SPECIALS.values())
# The reasoning tags are single tokens, as in real reasoning tokenizers: shorter sequences, and the model
# does not have to learn to spell them.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS) + len(TAG_TOKENS)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: "
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
"""The tiny tokenizers' chat template, so conversational data runs offline on tiny models: ``role: content<eos>``
per turn (the eos ends a turn, as Qwen's ``<|im_end|>`` does), ``assistant: `` as the generation prompt, and an
empty think block after it with ``enable_thinking=False`` (Qwen3's switch, through ``model.chat_template_kwargs``)."""


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
    tokenizer: Literal["char", "bpe"] = "char"
    """``char``: a token per printable ASCII character (and per reasoning tag); ``bpe``: byte-level BPE trained
    offline, and cached, on a corpus the caller passes (:func:`load_policy`'s ``corpus``)."""
    bpe_vocab_size: int = 2048
    """Most tokens of the ``bpe`` tokenizer (fewer if its corpus runs out of pairs to merge); at least 264."""
    corpus_records: int = 4000
    """Train records of the word-problem task whose texts the ``bpe`` tokenizer is trained on (the module builds
    that corpus; the model's config cannot see the data's)."""

    def __post_init__(self) -> None:
        require_finite_fields(self, "model.tiny")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("tiny.hidden_size must be divisible by tiny.num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("tiny.num_attention_heads must be divisible by tiny.num_key_value_heads")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"model.tiny.tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.bpe_vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"model.tiny.bpe_vocab_size must be >= {MIN_BPE_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                f"+ {len(TAG_TOKENS)} tag tokens), got {self.bpe_vocab_size}"
            )
        if self.corpus_records < 1:
            raise ValueError(f"model.tiny.corpus_records must be >= 1, got {self.corpus_records}")


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
    return PreTrainedTokenizerFast(tokenizer_object=backend, **TOKENIZER_SPECIALS)


def build_tiny_tokenizer(
    arch: TinyArchitecture, corpus: Callable[[], Iterable[str]] | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer ``arch.tokenizer`` names: the character one, or byte-level BPE of ``arch.bpe_vocab_size`` tokens
    trained on ``corpus()`` (cached by the corpus's hash, :func:`corrpo.models.bpe_tokenizer.cached_bpe_tokenizer`),
    with the same special tokens and the reasoning tags as single tokens; both with :data:`TINY_CHAT_TEMPLATE`."""
    if arch.tokenizer == "char":
        tokenizer = build_char_tokenizer()
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        return tokenizer
    if corpus is None:
        raise ValueError(
            "model.tiny.tokenizer=bpe trains its tokenizer on a corpus, and none was given: pass "
            "load_policy(..., corpus=<callable returning texts>) (CorrPOModule passes the word-problem task's)"
        )
    tokenizer = cached_bpe_tokenizer(
        corpus, arch.bpe_vocab_size, special_tokens=TOKENIZER_SPECIALS, added_tokens=TAG_TOKENS
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_policy(
    family: str, tokenizer: PreTrainedTokenizerBase, arch: TinyArchitecture, seed: int = 0
) -> PreTrainedModel:
    """A random model of ``family`` (``qwen2``, ``llama``, ... :mod:`corrpo.models.tiny_families`) sized by ``arch``."""
    config = tiny_config(
        family, len(tokenizer), arch, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    # Gemma 2's attention soft-capping and gpt-oss's sinks have no SDPA kernel in transformers: it picks eager
    if family not in ("gemma2", "gpt_oss"):
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
    corpus: Callable[[], Iterable[str]] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the policy and its tokenizer.

    Args:
        policy: ``tiny-qwen2``, ``tiny-llama``, a local folder, or a Hugging Face model name.
        tiny: architecture for the tiny families (ignored otherwise).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``).
        corpus: the texts a tiny ``bpe`` tokenizer trains on, called only then (``models`` cannot import the data).
    """
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"model.dtype: unknown dtype {dtype!r}")
    if policy in TINY_FAMILIES:
        tiny = tiny or TinyArchitecture()
        tokenizer = build_tiny_tokenizer(tiny, corpus)
        model = build_tiny_policy(TINY_FAMILIES[policy], tokenizer, tiny, seed)
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
    require_finite_weights(model, policy)  # a NaN weight fails here, naming the file, not at the first probe
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
    # before anything is written: a policy with a NaN or inf weight is never exported (NonFiniteWeightsError)
    require_finite_state(state_dict if state_dict is not None else model.state_dict(), f"the policy to {folder}")
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
