"""A byte-level BPE tokenizer trained offline on a corpus, and a disk cache of it.

Why: a real reasoning LM's token distribution is over sub-word pieces: its high-entropy "forking" tokens are whole
words (which verb, which connective), not letters. The character tokenizer spreads one word choice over many
near-determined letter tokens; BPE trained on the task's own text gives word-level tokens like a real LM's, and
builds here in seconds with the ``tokenizers`` library: nothing is downloaded.

Format (GPT-2 style): the ``ByteLevel`` pre-tokenizer maps each byte of the UTF-8 text to one of 256 printable
symbols and splits at GPT-2's regex (a word with its leading space, a run of digits, punctuation); BPE merges
symbol pairs in the order learned from the corpus (most frequent pair first, pairs seen fewer than
:data:`MIN_FREQUENCY` times never); the ``ByteLevel`` decoder inverts the byte map. All 256 bytes are in the initial
alphabet, so any text encodes (no unknown token ever) and ``decode(encode(text)) == text`` exactly (no prefix space
is added and ``clean_up_tokenization_spaces`` is off).

Ids: the special tokens first, in the order given (``pad``, ``bos``, ``eos``, ``unk`` from
:func:`corrpo.models.loading.build_tiny_tokenizer`: ids 0-3, as in the character tokenizer), then the added tokens
(the reasoning tags: ids 4-7), then the bytes and the merges. The added tokens are matched in the raw text before
pre-tokenization, so each is one token that never merges with its neighbours; they are registered NON-special so
``decode(..., skip_special_tokens=True)`` keeps them (the module decodes rollouts that way and the format reward
reads the tags), as with the character tokenizer, whose tags are plain vocabulary. Training text is cut at the
added tokens, as encoding cuts it, so no merge is spent on tag fragments.

Determinism: the same corpus, settings and ``tokenizers`` version give a byte-identical ``tokenizer.json`` (merge
ties are broken by the pair's ids, which follow the sorted alphabet), in any process.

Cache: :func:`cached_bpe_tokenizer` keys the trained tokenizer by a SHA-256 of the settings, the ``tokenizers``
version and the corpus text, in ``$CORRPO_CACHE/tokenizers`` (default ``~/.cache/corrpo/tokenizers``), written to a
temporary file then ``os.replace``-d into place, so concurrent ranks or runs never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CACHE_ENV = "CORRPO_CACHE"
"""Environment variable naming corrpo's cache root (default ``~/.cache/corrpo``); tokenizers go to ``tokenizers/``."""
MIN_FREQUENCY = 2
"""A pair seen once in the corpus is an accident of it, not a piece worth a token."""
_RECIPE = 1
"""Bumped whenever the training recipe changes, so that older cache entries are never read as current ones."""


def _pieces(corpus: Iterable[str], added_tokens: Sequence[str]) -> Iterator[str]:
    """The corpus cut at the added tokens (which encoding extracts before pre-tokenizing), empty pieces dropped."""
    if not added_tokens:
        yield from corpus
        return
    pattern = re.compile("|".join(re.escape(token) for token in added_tokens))
    for text in corpus:
        yield from (piece for piece in pattern.split(text) if piece)


def _train_backend(
    corpus: Iterable[str], vocab_size: int, special_tokens: Mapping[str, str], added_tokens: Sequence[str]
) -> Tokenizer:
    reserved = len(special_tokens) + len(added_tokens)
    if vocab_size < 256 + reserved:
        raise ValueError(f"BPE vocab_size must be >= 256 bytes + {reserved} special/added tokens, got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # ids in this order; the trainer registers every one of them as special, the added ones are re-registered below
    reserved_tokens = [AddedToken(token, special=True, normalized=False) for token in special_tokens.values()]
    reserved_tokens += [AddedToken(token, special=False, normalized=False) for token in added_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        special_tokens=reserved_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_pieces(corpus, added_tokens), trainer)
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in added_tokens])  # same ids
    return backend


def _wrap(backend: Tokenizer, special_tokens: Mapping[str, str]) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **special_tokens)


def train_bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    special_tokens: Mapping[str, str],
    added_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``corpus`` (format: module docstring).

    Args:
        corpus: the training texts (each pre-tokenized on its own).
        vocab_size: the most tokens, reserved ones included; fewer when the corpus has no more pairs to merge.
        special_tokens: tokenizer attribute -> token, e.g. ``{"pad_token": "<pad>", "eos_token": "<eos>"}``: set as
            those attributes, ids from 0 in this order.
        added_tokens: strings that are always one token, never merged with text, and kept by
            ``skip_special_tokens`` (the reasoning tags), ids right after the special tokens.
    """
    return _wrap(_train_backend(corpus, vocab_size, special_tokens, added_tokens), special_tokens)


def default_cache_dir() -> Path:
    """``$CORRPO_CACHE/tokenizers``, or ``~/.cache/corrpo/tokenizers``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "corrpo") / "tokenizers"


def cache_key(
    texts: Sequence[str], vocab_size: int, special_tokens: Mapping[str, str], added_tokens: Sequence[str]
) -> str:
    """SHA-256 (hex) of the settings, the recipe and ``tokenizers`` versions, and the texts (each length-prefixed, so
    no two corpora collide by where one text ends and the next begins)."""
    settings = {
        "recipe": _RECIPE,
        "tokenizers": tokenizers.__version__,
        "vocab_size": vocab_size,
        "min_frequency": MIN_FREQUENCY,
        "special_tokens": dict(special_tokens),
        "added_tokens": list(added_tokens),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8"))
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def cached_bpe_tokenizer(
    corpus_fn: Callable[[], Iterable[str]],
    vocab_size: int,
    cache_dir: str | Path | None = None,
    *,
    special_tokens: Mapping[str, str],
    added_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """:func:`train_bpe_tokenizer` on ``corpus_fn()``, trained once per (corpus, settings) and loaded from
    ``cache_dir`` (default :func:`default_cache_dir`) after that. ``corpus_fn`` is called every time: the key hashes
    its text, so a changed corpus never loads a stale tokenizer. A cache that cannot be written is warned about and
    the freshly trained tokenizer returned."""
    texts = list(corpus_fn())
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"bpe-{vocab_size}-{cache_key(texts, vocab_size, special_tokens, added_tokens)[:32]}.json"
    if path.is_file():
        return _wrap(Tokenizer.from_file(str(path)), special_tokens)
    backend = _train_backend(texts, vocab_size, special_tokens, added_tokens)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(backend.to_str())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        warnings.warn(f"BPE tokenizer cache {folder} is not writable ({err}); set ${CACHE_ENV}", stacklevel=2)
    return _wrap(backend, special_tokens)
