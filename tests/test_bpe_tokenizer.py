"""The offline byte-level BPE tokenizer: exact round trips, whole tags, determinism, the cache, a tiny policy on it."""

import pytest
import torch

from corrpo.data.arithmetic import ArithmeticTask
from corrpo.models import bpe_tokenizer
from corrpo.models.bpe_tokenizer import cached_bpe_tokenizer, train_bpe_tokenizer
from corrpo.models.loading import (
    TAG_TOKENS,
    TOKENIZER_SPECIALS,
    TinyArchitecture,
    build_char_tokenizer,
    export_policy,
    load_policy,
)

CORPUS = ArithmeticTask(render="words").corpus(300)
UNSEEN = "Zoë's 12 çafés\n\n  cost 3 * 4 = 12 €, 日本 🙂\t<think> x</think>y<answer> 7 </answer>end"


def train(corpus=CORPUS, vocab_size=600):
    return train_bpe_tokenizer(corpus, vocab_size, TOKENIZER_SPECIALS, TAG_TOKENS)


def test_round_trips_exactly_and_keeps_the_tags_whole():
    tok = train()
    for text in [*CORPUS, UNSEEN, "", " ", "a  b "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    pieces = tok.tokenize("now?<think>Mia</think><answer>9</answer>")
    for tag in TAG_TOKENS:
        assert pieces.count(tag) == 1
    assert [tok.convert_tokens_to_ids(tag) for tag in TAG_TOKENS] == [4, 5, 6, 7]
    # the tags are kept by skip_special_tokens (the module decodes rollouts so; the format reward reads them)
    ids = tok(CORPUS[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == CORPUS[1]
    char = build_char_tokenizer()  # the same special tokens as the char tokenizer, same attributes and ids
    for attr in TOKENIZER_SPECIALS:
        assert getattr(tok, attr) == getattr(char, attr) and getattr(tok, attr + "_id") == getattr(char, attr + "_id")
    assert 264 < len(tok) <= 600
    # word-level pieces: a trace is far shorter than its characters
    assert len(tok(CORPUS[1], add_special_tokens=False)["input_ids"]) < len(CORPUS[1]) / 3


def test_training_is_deterministic(tmp_path):
    files = []
    for name in ("a", "b"):
        train().save_pretrained(tmp_path / name)
        files.append((tmp_path / name / "tokenizer.json").read_bytes())
    assert files[0] == files[1]
    train(CORPUS[:200]).save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() != files[0]
    with pytest.raises(ValueError, match="vocab_size"):
        train(vocab_size=100)


def test_cache_trains_once_per_corpus_and_settings(tmp_path, monkeypatch):
    reference = train().backend_tokenizer.to_str()
    calls = []
    real = bpe_tokenizer._train_backend
    monkeypatch.setattr(bpe_tokenizer, "_train_backend", lambda *args: calls.append(1) or real(*args))
    monkeypatch.setenv("CORRPO_CACHE", str(tmp_path))

    def cached(corpus=CORPUS, vocab_size=600):
        return cached_bpe_tokenizer(
            lambda: corpus, vocab_size, special_tokens=TOKENIZER_SPECIALS, added_tokens=TAG_TOKENS
        )

    first = cached()
    second = cached()
    assert len(calls) == 1
    assert second.backend_tokenizer.to_str() == first.backend_tokenizer.to_str() == reference
    assert second.eos_token_id == first.eos_token_id and second.decode(second(UNSEEN)["input_ids"]) == UNSEEN
    (entry,) = (tmp_path / "tokenizers").iterdir()  # under $CORRPO_CACHE, no temporary file left
    assert entry.name.startswith("bpe-600-") and entry.suffix == ".json"
    cached(CORPUS[:200])
    cached(vocab_size=500)
    assert len(calls) == 3  # another corpus or size is another entry
    other = tmp_path / "elsewhere"
    cached_bpe_tokenizer(lambda: CORPUS, 600, other, special_tokens=TOKENIZER_SPECIALS, added_tokens=TAG_TOKENS)
    assert len(calls) == 4 and len(list(other.iterdir())) == 1


def test_tiny_policy_with_bpe_builds_runs_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("CORRPO_CACHE", str(tmp_path / "cache"))
    arch = TinyArchitecture(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            tokenizer="bpe", bpe_vocab_size=600)  # fmt: skip
    model, tok = load_policy("tiny-qwen2", arch, seed=1, corpus=lambda: CORPUS)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) > len(build_char_tokenizer())
    ids = torch.tensor([tok(CORPUS[0] + CORPUS[1], add_special_tokens=False)["input_ids"]])
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    folder = export_policy(model, tok, tmp_path / "policy")
    model2, tok2 = load_policy(str(folder))
    assert (
        tok2(CORPUS[1], add_special_tokens=False)["input_ids"] == ids[0, -len(tok(CORPUS[1])["input_ids"]) :].tolist()
    )
    assert tok2.decode(ids[0].tolist(), skip_special_tokens=True) == CORPUS[0] + CORPUS[1]
    with torch.no_grad():
        assert torch.equal(model2.eval()(ids).logits, logits)


def test_bpe_settings_are_checked_and_named():
    with pytest.raises(ValueError, match="model.tiny.tokenizer"):
        TinyArchitecture(tokenizer="words")
    with pytest.raises(ValueError, match="model.tiny.bpe_vocab_size"):
        TinyArchitecture(tokenizer="bpe", bpe_vocab_size=100)
    with pytest.raises(ValueError, match="model.tiny.corpus_records"):
        TinyArchitecture(corpus_records=0)
    with pytest.raises(ValueError, match="model.tiny.tokenizer=bpe"):
        load_policy("tiny-qwen2", TinyArchitecture(hidden_size=32, num_hidden_layers=1, tokenizer="bpe"))


def test_module_trains_its_bpe_tokenizer_on_word_problems(tmp_path, monkeypatch):
    from corrpo.module import CorrPOModule

    monkeypatch.setenv("CORRPO_CACHE", str(tmp_path))
    arch = TinyArchitecture(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            tokenizer="bpe", bpe_vocab_size=600, corpus_records=150)  # fmt: skip
    module = CorrPOModule(policy="tiny-qwen2", tiny=arch)
    words = ArithmeticTask(render="words").corpus(150)
    expected = train(words).backend_tokenizer.to_str()
    assert module.tokenizer.backend_tokenizer.to_str() == expected
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
