"""Long sequences are scored in bounded pieces (token blocks, K's token groups, V's row pieces): chunked, a sequence
gets exactly the values it gets in one piece, on small T with tiny pieces so the test is fast."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import corrpo.inversion.strength_k as strength_k
import corrpo.inversion.strength_kv as strength_kv
from corrpo.inversion.strength import StrengthConfig, logit_grad_strength
from corrpo.inversion.strength_common import max_relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("projections", [["q", "v", "o"], ["q", "k", "v", "o"], ["k"]])
def test_a_sequence_chunked_into_small_pieces_gets_its_unchunked_values(monkeypatch, projections) -> None:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (2, 72), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # a left-padded second row
    scored = mask.bool()
    whole = logit_grad_strength(model, ids, mask, scored, StrengthConfig(projections=projections, chunk_size=256))
    monkeypatch.setattr(strength_k, "K_GROUP_ELEMENTS", 1)  # one token per K group
    monkeypatch.setattr(strength_kv, "V_BATCH_ELEMENTS", 4 * 72)  # one token per V piece
    chunked = logit_grad_strength(model, ids, mask, scored, StrengthConfig(projections=projections, chunk_size=5))
    assert max_relative_error(chunked, whole) <= 1e-5
    loop = logit_grad_strength(model, ids, mask, scored, StrengthConfig(projections=projections, method="loop"))
    assert max_relative_error(chunked, loop) <= 1e-4
