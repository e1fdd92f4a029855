"""The lean decode loop against HF ``generate``: identical greedy tokens, the same sampling distribution."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

import corrpo.generation.decode_loop as fast_decode
import corrpo.generation.decode_step as decode_step
from corrpo.generation.decode_loop import DecodeLoopGenerator
from corrpo.generation.decode_step import cached_attention
from corrpo.generation.rollout import HFGenerator, SamplingConfig
from corrpo.generation.sampling import draw_tokens, next_token_probs
from corrpo.models.loading import TinyArchitecture
from corrpo.models.tiny_families import random_family_model, tiny_config

VOCAB, PAD = 64, 0
ARCH = TinyArchitecture(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def model_of(family: str, **overrides) -> torch.nn.Module:
    """A random fp32 ``family`` model with large weights (sharp logits), no sliding window unless asked."""
    config = tiny_config(family, VOCAB, ARCH, PAD, 1, 2, initializer_range=0.2, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
    return model


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded to the longest."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=gen)
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def an_eos_mid_way(model, ids, mask, new: int) -> int:
    """A token HF's greedy decoding emits in the middle of row 0's completion: with it as eos, rows stop early."""
    free_run = HFGenerator().generate(model, ids, mask, 1, SamplingConfig(max_new_tokens=new), VOCAB + 1, PAD, True)
    return int(free_run.completion_ids[0, new // 3])


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "mistral"])
def test_greedy_tokens_equal_hf_generate_on_left_padded_prompts_with_eos_mid_way(family):
    model = model_of(family)
    ids, mask = left_padded([9, 4, 7, 1, 6])
    new = 24
    eos = an_eos_mid_way(model, ids, mask, new)
    sampling = SamplingConfig(max_new_tokens=new)
    engine = DecodeLoopGenerator()
    for G in (1, 2):
        reference = HFGenerator().generate(model, ids, mask, G, sampling, eos, PAD, greedy=True)
        fast = engine.generate(model, ids, mask, G, sampling, eos, PAD, greedy=True)
        assert engine.fallback_reason is None
        lengths = reference.completion_mask.sum(1)
        assert lengths.min() < new and not reference.truncated.all()  # eos really came mid-way
        for field in ("sequences", "attention_mask", "completion_mask", "truncated"):
            assert torch.equal(getattr(fast, field), getattr(reference, field)), (family, G, field)


def test_greedy_tokens_equal_hf_generate_without_padding():
    model = model_of("qwen2")
    ids, mask = left_padded([6, 6, 6])
    sampling = SamplingConfig(max_new_tokens=16)
    reference = HFGenerator().generate(model, ids, mask, 1, sampling, 2, PAD, greedy=True)
    fast = DecodeLoopGenerator().generate(model, ids, mask, 1, sampling, 2, PAD, greedy=True)
    assert torch.equal(fast.sequences, reference.sequences)


def test_next_token_probs_equal_hf_temperature_then_top_p_then_softmax():
    logits = torch.randn(7, 50) * 3
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.3, 0.9), (0.5, 0.3)):
        scores = TemperatureLogitsWarper(temperature)(None, logits) if temperature != 1.0 else logits
        scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores
        assert torch.allclose(next_token_probs(logits, temperature, top_p), scores.softmax(-1), atol=1e-7, rtol=0)
    kept = (next_token_probs(logits, 1.0, 0.3) > 0).sum(-1)
    assert (kept >= 1).all() and (kept < logits.shape[1]).all()  # the nucleus cut bites and keeps the top token


def test_each_sampled_step_draws_from_hf_tempered_nucleus_of_the_same_prefix(monkeypatch):
    """The distribution every step samples from, recorded with the rows it was drawn for (finished rows are
    dropped from the batch on the way), equals HF's on the sampled prefix (teacher forcing)."""
    model = model_of("qwen3")
    ids, mask = left_padded([8, 3, 5])
    G, temperature, top_p, new = 3, 0.8, 0.9, 12
    recorded = []

    def recording(logits, rows, num_rows, sampling, greedy):
        recorded.append((rows.clone(), next_token_probs(logits, sampling.temperature, sampling.top_p)))
        return draw_tokens(logits, rows, num_rows, sampling, greedy)

    monkeypatch.setattr(fast_decode, "draw_tokens", recording)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=new)
    torch.manual_seed(0)
    eos = int(DecodeLoopGenerator().generate(model, ids, mask, G, sampling, VOCAB + 1, PAD).completion_ids[0, 4])
    recorded.clear()
    torch.manual_seed(0)
    rollout = DecodeLoopGenerator(compact_below=1.0).generate(model, ids, mask, G, sampling, eos, PAD)
    P = rollout.prompt_length
    full_mask = torch.cat([mask.repeat_interleave(G, 0), torch.ones_like(rollout.completion_ids)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=full_mask, position_ids=positions).logits
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    assert len(recorded) == rollout.completion_mask.shape[1]
    assert len(recorded[-1][0]) < G * len(ids)  # finished rows really were dropped
    for t, (rows, probs) in enumerate(recorded):
        scores = logits[:, P + t - 1].float()
        for warper in warpers:
            scores = warper(None, scores)
        live = rollout.completion_mask[rows, t]  # of the computed rows, those still running at step t
        assert torch.allclose(probs[live], scores.softmax(-1)[rows][live], atol=1e-5, rtol=0), t


def test_drawing_for_some_rows_equals_torch_multinomial_over_all_rows():
    """``draw_tokens`` consumes the RNG as ``torch.multinomial`` on the whole batch and draws the same tokens."""
    logits = torch.randn(9, 40) * 2
    sampling = SamplingConfig(temperature=0.7, top_p=0.9)
    torch.manual_seed(5)
    reference = torch.multinomial(next_token_probs(logits, 0.7, 0.9), 1).squeeze(1)
    after = torch.rand(3)
    for rows in (torch.arange(9), torch.tensor([0, 3, 4, 8])):
        torch.manual_seed(5)
        drawn = draw_tokens(logits[rows], rows, 9, sampling, greedy=False)
        assert torch.equal(drawn, reference[rows])
        assert torch.equal(torch.rand(3), after)  # the same RNG consumed
    assert torch.equal(draw_tokens(logits, torch.arange(9), 9, sampling, greedy=True), logits.argmax(-1))


@pytest.mark.parametrize("compact_below", [0.0, 0.5, 0.875, 1.0])
def test_dropping_finished_rows_keeps_hf_generate_samples_and_greedy_tokens(compact_below):
    """With an eos that sampled rows really emit mid-way, every drop threshold gives HF's tokens (same seed)."""
    model = model_of("qwen2")
    ids, mask = left_padded([7, 2, 5, 4])
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=20)
    torch.manual_seed(2)
    eos = int(HFGenerator().generate(model, ids, mask, 4, sampling, VOCAB + 1, PAD).completion_ids[0, 6])
    engine = DecodeLoopGenerator(compact_below=compact_below)
    for greedy in (False, True):
        torch.manual_seed(7)
        reference = HFGenerator().generate(model, ids, mask, 4, sampling, eos, PAD, greedy=greedy)
        torch.manual_seed(7)
        fast = engine.generate(model, ids, mask, 4, sampling, eos, PAD, greedy=greedy)
        assert engine.fallback_reason is None
        if not greedy:
            lengths = reference.completion_mask.sum(1)
            assert lengths.min() < lengths.max() and reference.truncated.any()  # rows stopped at different steps
        assert torch.equal(fast.sequences, reference.sequences), (compact_below, greedy)


def test_a_drop_threshold_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="compact_below"):
        DecodeLoopGenerator(compact_below=1.5)


def test_with_the_same_seed_the_samples_equal_hf_generate_samples():
    """The same per-step distribution and the same ``torch.multinomial`` call on it consume the RNG alike, so a
    seeded run samples what HF would have sampled (what keeps seeded training runs as they were)."""
    model = model_of("qwen2")
    ids, mask = left_padded([7, 2, 5])
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=16)
    rollouts = []
    for engine in (HFGenerator(), DecodeLoopGenerator()):
        torch.manual_seed(3)
        rollouts.append(engine.generate(model, ids, mask, 4, sampling, 2, PAD))
    assert torch.equal(rollouts[0].sequences, rollouts[1].sequences)


def test_sampled_token_frequencies_match_hf_distribution():
    """Second tokens of many samples: their frequencies match the exact two-step marginal from HF's forward."""
    model = model_of("llama")
    ids, mask = left_padded([5])
    n, temperature = 4000, 1.2
    torch.manual_seed(1)
    sampling = SamplingConfig(temperature=temperature, max_new_tokens=2)
    rollout = DecodeLoopGenerator().generate(model, ids, mask, n, sampling, VOCAB + 1, PAD)
    with torch.no_grad():
        first = F.softmax(model(input_ids=ids).logits[0, -1] / temperature, -1)  # [V]
        continued = torch.cat([ids.expand(VOCAB, -1), torch.arange(VOCAB)[:, None]], 1)
        second = F.softmax(model(input_ids=continued).logits[:, -1] / temperature, -1)  # [V, V]
    expected = first @ second
    observed = torch.bincount(rollout.completion_ids[:, 1], minlength=VOCAB).float() / n
    total_variation = 0.5 * (observed - expected).abs().sum()
    # sampling noise alone: E[TV] <= sum_i sqrt(p_i (1 - p_i) / n) / 2
    noise = 0.5 * (expected * (1 - expected) / n).sqrt().sum()
    assert total_variation < 3 * noise, (float(total_variation), float(noise))


def test_cached_attention_equals_sdpa_over_the_whole_cache():
    gen = torch.Generator().manual_seed(0)
    N, heads_q, heads_kv, d, S = 5, 4, 2, 8, 7
    n_rep = heads_q // heads_kv
    q = torch.randn(N, heads_q, d, generator=gen)
    keys, values = torch.randn(2, N, heads_kv, S, d, generator=gen)
    real = torch.rand(N, S, generator=gen) > 0.3
    real[:, -1] = True
    same = (torch.arange(heads_q) // n_rep)[:, None] == torch.arange(heads_kv)
    bias = decode_step._additive((real[:, None, :, None] & same[None, :, None, :]).flatten(2))
    out = cached_attention(q, keys.transpose(1, 2).flatten(1, 2), values.transpose(1, 2).flatten(1, 2), bias, d**-0.5)
    visible = real[:, None, None, :]
    reference = F.scaled_dot_product_attention(
        q[:, :, None], keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1), attn_mask=visible
    )[:, :, 0]
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)


SHORT_WINDOW = dict(use_sliding_window=True, sliding_window=5, layer_types=["full_attention", "sliding_attention"])


def with_repetition_penalty(model):
    model.generation_config.repetition_penalty = 1.3
    return model


@pytest.mark.parametrize(
    "model, reason",
    [
        (random_family_model("gemma", VOCAB, ARCH), "model_type 'gemma'"),
        (model_of("qwen2", **SHORT_WINDOW), "sliding window (5)"),
        (with_repetition_penalty(model_of("llama")), "generation_config.repetition_penalty = 1.3"),
    ],
)
def test_an_unsupported_model_falls_back_to_hf_generate_and_says_why(model, reason):
    ids, mask = left_padded([6, 3])
    sampling = SamplingConfig(max_new_tokens=8)
    engine = DecodeLoopGenerator()
    fast = engine.generate(model, ids, mask, 1, sampling, 2, PAD, greedy=True)
    assert reason in engine.fallback_reason
    assert torch.equal(fast.sequences, HFGenerator().generate(model, ids, mask, 1, sampling, 2, PAD, True).sequences)


def test_lora_adapters_fall_back_to_hf_generate():
    pytest.importorskip("peft")
    from corrpo.models.lora import LoRAConfig, apply_lora

    model = apply_lora(model_of("llama"), LoRAConfig(), 0)
    ids, mask = left_padded([4, 6])
    engine = DecodeLoopGenerator()
    engine.generate(model, ids, mask, 1, SamplingConfig(max_new_tokens=4), 2, PAD, greedy=True)
    assert engine.fallback_reason is not None


def test_the_module_decodes_rollouts_and_greedy_evaluation_with_the_lean_loop_by_default():
    from corrpo.data.arithmetic import ArithmeticTask
    from corrpo.module import CorrPOModule

    module = CorrPOModule(tiny=ARCH)
    assert isinstance(module.generator, DecodeLoopGenerator)
    records = ArithmeticTask().records("test", 3)
    module.evaluator.test_accuracy(records)  # greedy evaluation: through module.generator
    assert module.generator.fallback_reason is None
    rollout = module.generate_rollout([r["prompt"] for r in records], 2)
    assert module.generator.fallback_reason is None and rollout.sequences.shape[0] == 6
