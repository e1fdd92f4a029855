"""Text-to-tensor helpers: SFT loss masks, left-padded prompts, completion masks and rollouts."""

import pytest
import torch

from corrpo.generation.rollout import rollout_from_sequences
from corrpo.models.batching import completion_mask, encode_prompts, encode_sft_batch
from corrpo.models.forward import position_ids_from_mask
from corrpo.models.loading import build_char_tokenizer

TOK = build_char_tokenizer()


def test_sft_batch_targets_only_completion_and_eos():
    enc = encode_sft_batch(TOK, ["ab", "c"], ["xy", "zzz"], max_length=64)
    ids, mask = enc["input_ids"], enc["loss_mask"]
    assert TOK.decode(ids[0][mask[0]]) == "xy<eos>"
    assert TOK.decode(ids[1][mask[1]]) == "zzz<eos>"
    assert enc["attention_mask"].sum(1).tolist() == [5, 5]
    cut = encode_sft_batch(TOK, ["abcd"], ["xyz"], max_length=5)
    assert cut["input_ids"].shape[1] == 5 and cut["loss_mask"].sum().item() == 1


def test_prompts_are_left_padded_with_real_positions():
    enc = encode_prompts(TOK, ["abc", "a"])
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(enc["attention_mask"]).tolist() == [[0, 1, 2], [0, 0, 0]]
    assert encode_prompts(TOK, ["abcdef"], max_prompt_length=2)["input_ids"].shape[1] == 2


def test_completion_mask_stops_at_first_eos_and_flags_truncation():
    eos = TOK.eos_token_id
    comp = torch.tensor([[5, eos, 7, eos], [5, 6, 7, 8]])
    mask, truncated = completion_mask(comp, eos)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert truncated.tolist() == [False, True]


def test_rollout_pads_after_eos():
    eos, pad = TOK.eos_token_id, TOK.pad_token_id
    prompt_mask = torch.tensor([[0, 1], [1, 1]])
    seqs = torch.tensor([[pad, 9, 5, eos, 7], [8, 9, 5, 6, 7]])
    r = rollout_from_sequences(seqs, prompt_mask, eos, pad)
    assert r.prompt_length == 2
    assert r.completion_ids.tolist() == [[5, eos, pad], [5, 6, 7]]
    assert r.attention_mask.tolist() == [[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert r.truncated.tolist() == [False, True]


def test_a_prompt_longer_than_the_models_positions_keeps_its_last_tokens_with_a_warning():
    from types import SimpleNamespace

    from corrpo.models.batching import prompt_position_budget

    tokenizer = TOK
    budget = prompt_position_budget(SimpleNamespace(max_position_embeddings=40), max_new_tokens=30)
    assert budget == 10
    with pytest.warns(UserWarning, match="1 prompt.*exceed the 10 positions"):
        enc = encode_prompts(tokenizer, ["1 +2 =", "9 " * 500 + "+1 ="], position_budget=budget)
    assert enc["input_ids"].shape[1] == 10
    long_row = enc["input_ids"][1].tolist()
    last_ten = tokenizer.encode("9 " * 500 + "+1 =", add_special_tokens=False)[-10:]
    assert long_row == last_ten
    with pytest.raises(ValueError, match="rl.sampling.max_new_tokens=40 leaves no room"):
        prompt_position_budget(SimpleNamespace(max_position_embeddings=40), max_new_tokens=40)
    assert prompt_position_budget(SimpleNamespace(), 10) is None
