"""The lean decode loop against HF ``generate``: identical greedy tokens, the same sampling distribution."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import corrpo.generation.decode_loop as fast_decode
import corrpo.generation.decode_step as decode_step
from corrpo.generation.decode_loop import DecodeLoopGenerator
from corrpo.generation.decode_step import cached_attention
from corrpo.generation.rollout import HFGenerator, SamplingConfig
from corrpo.generation.sampling import draw_tokens, next_token_probs, penalize_repetitions, prompt_tokens_seen
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


def replayed_steps(monkeypatch, model, ids, mask, G: int, sampling: SamplingConfig, probs_of):
    """Sample with the lean loop, recording each step's rows and the distribution ``probs_of(logits)`` it drew from
    (eos chosen mid-way so rows finish and are dropped); then the model's logits of the sampled prefix (teacher
    forcing). Returns ``(rollout, recorded, logits, prompt_mask)``."""
    recorded = []

    def recording(logits, rows, num_rows, sampling, greedy):
        recorded.append((rows.clone(), probs_of(logits)))
        return draw_tokens(logits, rows, num_rows, sampling, greedy)

    monkeypatch.setattr(fast_decode, "draw_tokens", recording)
    torch.manual_seed(0)
    eos = int(DecodeLoopGenerator().generate(model, ids, mask, G, sampling, VOCAB + 1, PAD).completion_ids[0, 4])
    recorded.clear()
    torch.manual_seed(0)
    rollout = DecodeLoopGenerator(compact_below=1.0).generate(model, ids, mask, G, sampling, eos, PAD)
    prompt_mask = mask.repeat_interleave(G, 0)
    full_mask = torch.cat([prompt_mask, torch.ones_like(rollout.completion_ids)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=rollout.sequences, attention_mask=full_mask, position_ids=positions).logits
    assert len(recorded) == rollout.completion_mask.shape[1]
    assert len(recorded[-1][0]) < G * len(ids)  # finished rows really were dropped
    return rollout, recorded, logits, prompt_mask


def test_each_sampled_step_draws_from_hf_tempered_nucleus_of_the_same_prefix(monkeypatch):
    """The distribution every step samples from, recorded with the rows it was drawn for (finished rows are
    dropped from the batch on the way), equals HF's on the sampled prefix (teacher forcing)."""
    model = model_of("qwen3")
    ids, mask = left_padded([8, 3, 5])
    temperature, top_p = 0.8, 0.9
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=12)
    probs_of = lambda logits: next_token_probs(logits, temperature, top_p)  # noqa: E731
    rollout, recorded, logits, _ = replayed_steps(monkeypatch, model, ids, mask, 3, sampling, probs_of)
    P = rollout.prompt_length
    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    for t, (rows, probs) in enumerate(recorded):
        scores = logits[:, P + t - 1].float()
        for warper in warpers:
            scores = warper(None, scores)
        live = rollout.completion_mask[rows, t]  # of the computed rows, those still running at step t
        assert torch.allclose(probs[live], scores.softmax(-1)[rows][live], atol=1e-5, rtol=0), t


def hf_processors(sampling: SamplingConfig, prompt_mask: torch.Tensor) -> list:
    """HF's processors of a sampled ``generate`` call with ``sampling``, in ``_get_logits_processor``'s order (the
    repetition penalty ignores each row's left padding, as ``generate`` makes it)."""
    processors = []
    if sampling.repetition_penalty != 1.0:
        padding = (prompt_mask != 0).int().argmax(dim=1)
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty, prompt_ignore_length=padding))
    if sampling.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p is not None:
        processors.append(MinPLogitsWarper(sampling.min_p))
    return processors


def corrpo_probs(input_ids, prompt_mask, logits, sampling: SamplingConfig) -> torch.Tensor:
    """The lean loop's distribution for ``logits`` after ``input_ids`` (prompt columns as ``prompt_mask``)."""
    seen = prompt_tokens_seen(input_ids[:, : prompt_mask.shape[1]], prompt_mask, logits.shape[1])
    seen.scatter_(1, input_ids[:, prompt_mask.shape[1] :], True)
    logits = penalize_repetitions(logits, seen, sampling.repetition_penalty)
    return next_token_probs(logits, sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p)


CONTROLS = [
    dict(top_k=5),
    dict(top_k=VOCAB + 10),  # wider than the vocabulary: HF keeps every token
    dict(min_p=0.1),
    dict(min_p=0.0),
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),  # < 1 favours repeats
    dict(temperature=0.8, top_p=0.9, top_k=8, min_p=0.05, repetition_penalty=1.3),
]


@pytest.mark.parametrize("controls", CONTROLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_each_sampling_control_equals_hf_logits_processor_on_the_same_prefix(controls):
    """Repetition penalty, top-k, min-p (and all with temperature and top-p) on the same input ids and scores:
    the lean loop's values equal HF's processors' bit for bit, and each control really removes or moves mass."""
    sampling = SamplingConfig(**controls)
    gen = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = left_padded([6, 2, 4])
    completion = torch.randint(0, VOCAB, (3, 5), generator=gen)
    input_ids = torch.cat([prompt_ids, completion], 1)
    logits = torch.randn(3, VOCAB, generator=gen) * 3
    scores = logits.clone()
    for processor in hf_processors(sampling, prompt_mask):
        scores = processor(input_ids, scores)
    probs = corrpo_probs(input_ids, prompt_mask, logits, sampling)
    assert torch.equal(probs, scores.softmax(-1))
    if controls not in (dict(top_k=VOCAB + 10), dict(min_p=0.0)):
        assert not torch.equal(probs, logits.softmax(-1))  # the control bites


def test_the_repetition_penalty_skips_left_padding_and_counts_prompt_and_completion_tokens():
    prompt_ids = torch.tensor([[PAD, PAD, 7, 8], [9, 10, 11, 12]])
    seen = prompt_tokens_seen(prompt_ids, (prompt_ids != PAD).long(), VOCAB)
    assert seen.sum(1).tolist() == [2, 4] and not seen[0, PAD] and seen[0, 7] and seen[1, 12]
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalized = penalize_repetitions(logits, torch.tensor([[True, True, False]]), 2.0)
    assert penalized.tolist() == [[1.0, -4.0, 1.0]]


def test_each_sampled_step_with_every_control_draws_from_hf_processed_distribution_of_the_same_prefix(monkeypatch):
    """Teacher forcing, as above, with a repetition penalty over prompt and completion, top-k and min-p on: every
    step's distribution equals HF's processors on the model's logits of the sampled prefix."""
    model = model_of("llama")
    ids, mask = left_padded([8, 3, 5])
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, top_k=10, min_p=0.05, repetition_penalty=1.4,
                              max_new_tokens=12)  # fmt: skip
    probs_of = lambda logits: next_token_probs(logits, 0.8, 0.95, 10, 0.05)  # noqa: E731
    rollout, recorded, logits, prompt_mask = replayed_steps(monkeypatch, model, ids, mask, 3, sampling, probs_of)
    P = rollout.prompt_length
    for t, (rows, probs) in enumerate(recorded):
        scores = logits[:, P + t - 1].float()
        for processor in hf_processors(sampling, prompt_mask):
            scores = processor(rollout.sequences[:, : P + t], scores)
        live = rollout.completion_mask[rows, t]
        assert torch.allclose(probs[live], scores.softmax(-1)[rows][live], atol=1e-5, rtol=0), t


@pytest.mark.parametrize("controls", CONTROLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_with_sampling_controls_greedy_and_same_seed_samples_equal_hf_generate(controls):
    """Each control (and all together) through the whole lean loop, finished rows dropped on the way: with the
    same seed the samples are HF ``generate``'s, greedy tokens too (greedy is the logits' argmax in both)."""
    model = model_of("qwen2")
    ids, mask = left_padded([7, 2, 5, 4])
    sampling = SamplingConfig(max_new_tokens=20, **controls)
    torch.manual_seed(2)
    eos = int(HFGenerator().generate(model, ids, mask, 4, sampling, VOCAB + 1, PAD).completion_ids[0, 6])
    engine = DecodeLoopGenerator()
    outputs = {}
    for greedy in (False, True):
        torch.manual_seed(7)
        reference = HFGenerator().generate(model, ids, mask, 4, sampling, eos, PAD, greedy=greedy)
        torch.manual_seed(7)
        outputs[greedy] = engine.generate(model, ids, mask, 4, sampling, eos, PAD, greedy=greedy)
        assert engine.fallback_reason is None
        assert torch.equal(outputs[greedy].sequences, reference.sequences), (controls, greedy)
    assert outputs[False].completion_mask.sum(1).min() < 20  # sampled rows stopped mid-way
    torch.manual_seed(7)
    plain = HFGenerator().generate(model, ids, mask, 4, SamplingConfig(max_new_tokens=20), eos, PAD)
    neutral = controls in (dict(top_k=VOCAB + 10), dict(min_p=0.0))  # values that keep every token
    assert torch.equal(plain.sequences, outputs[False].sequences) == neutral  # the others change the samples


def test_a_sampled_call_overrides_a_generation_config_repetition_penalty_as_trl_does():
    """TRL passes ``repetition_penalty=1.0`` explicitly, so a model's ``generation_config`` penalty (Qwen2.5-Instruct
    ships 1.05) does not apply to rollouts: the lean loop serves the call and samples HF's tokens; greedy
    decoding, which sets no penalty, still falls back to HF, which applies the model's."""
    model = with_repetition_penalty(model_of("llama"))
    ids, mask = left_padded([6, 3])
    engine = DecodeLoopGenerator()
    for penalty in (1.0, 1.2):
        sampling = SamplingConfig(max_new_tokens=8, repetition_penalty=penalty)
        torch.manual_seed(4)
        fast = engine.generate(model, ids, mask, 2, sampling, 2, PAD)
        assert engine.fallback_reason is None
        torch.manual_seed(4)
        assert torch.equal(fast.sequences, HFGenerator().generate(model, ids, mask, 2, sampling, 2, PAD).sequences)
    engine.generate(model, ids, mask, 1, sampling, 2, PAD, greedy=True)
    assert "generation_config.repetition_penalty = 1.3" in engine.fallback_reason


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
