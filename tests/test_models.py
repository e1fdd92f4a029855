"""Tiny policies and the character tokenizer round-trip through save_pretrained / from_pretrained."""

import pytest
import torch

from corrpo.models.loading import TinyArchitecture, build_char_tokenizer, export_policy, load_policy

TRACE = "7 +3 *2\n<think>7+3=10 10*2=20</think><answer>20</answer>"


def test_char_tokenizer_round_trips_text_and_keeps_tags_whole():
    tok = build_char_tokenizer()
    ids = tok(TRACE, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TRACE
    assert tok.convert_tokens_to_ids("<think>") in ids
    assert len(ids) == len(TRACE) - sum(len(t) - 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
    assert tok.decode(tok("a\u00e9b", add_special_tokens=False)["input_ids"]) == "a<unk>b"


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-llama"])
def test_model_save_reload_gives_identical_logits_and_tokens(tmp_path, family):
    arch = TinyArchitecture(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model, tok = load_policy(family, arch, seed=3)
    folder = export_policy(model, tok, tmp_path / "policy")
    model2, tok2 = load_policy(str(folder))
    assert type(model2) is type(model)
    ids = torch.tensor([tok(TRACE, add_special_tokens=False)["input_ids"]])
    assert tok2(TRACE, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    model.eval(), model2.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)


def test_tiny_seed_controls_weights_and_bad_inputs_are_named():
    arch = TinyArchitecture(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    a, _ = load_policy("tiny-qwen2", arch, seed=1)
    b, _ = load_policy("tiny-qwen2", arch, seed=1)
    c, _ = load_policy("tiny-qwen2", arch, seed=2)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    with pytest.raises(ValueError, match="model.dtype"):
        load_policy("tiny-qwen2", arch, dtype="float99")
    with pytest.raises(ValueError, match="model.policy"):
        load_policy("/nonexistent/folder")
    with pytest.raises(ValueError, match="divisible"):
        TinyArchitecture(hidden_size=30, num_attention_heads=4)


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-gpt2"])
def test_tiny_untied_unembedding_is_its_own_matrix_and_tied_is_shared(family):
    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    tied, _ = load_policy(family, TinyArchitecture(**kw))
    untied, _ = load_policy(family, TinyArchitecture(**kw, tie_word_embeddings=False))
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    assert not torch.equal(untied.get_output_embeddings().weight, untied.get_input_embeddings().weight)
