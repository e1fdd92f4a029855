"""``rl.sampling``'s top-k, min-p and repetition penalty (TRL ``GRPOConfig``'s keys): checked with errors naming the
key, handed to every engine with TRL's meaning, and kept out of the update's log-probs (``softmax(logits / T)``).

The lean loop's values against HF's logits processors are in ``tests/test_fast_decode.py``."""

import dataclasses
import re

import pytest
import torch
from conftest import TINY_ARCH

from corrpo.data.arithmetic import ArithmeticTask
from corrpo.generation.rollout import Generator, HFGenerator, SamplingConfig, sampling_kwargs
from corrpo.generation.vllm import sampling_params_kwargs
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig

G = 4


def test_the_controls_default_to_off_with_trl_defaults():
    trl = pytest.importorskip("trl")
    theirs = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        assert getattr(SamplingConfig(), key) == theirs[key], key


@pytest.mark.parametrize(
    "value, message",
    [
        (dict(top_k=-1), "rl.sampling.top_k must be an integer >= 0 (0 = off), got -1"),
        (dict(top_k=2.5), "rl.sampling.top_k must be an integer >= 0"),
        (dict(top_k=True), "rl.sampling.top_k must be an integer >= 0"),
        (dict(min_p=1.5), "rl.sampling.min_p must be in [0, 1] or null (off), got 1.5"),
        (dict(min_p=-0.1), "rl.sampling.min_p must be in"),
        (dict(repetition_penalty=0.0), "rl.sampling.repetition_penalty must be > 0 (1.0 = off), got 0.0"),
        (dict(repetition_penalty=-1.2), "rl.sampling.repetition_penalty must be > 0"),
    ],
)
def test_a_bad_sampling_control_is_an_error_naming_the_key(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RLConfig(sampling=value)  # a config file's mapping, as the CLI hands it over


def test_hf_generate_gets_the_controls_as_trl_passes_them():
    assert sampling_kwargs(SamplingConfig(top_k=7, min_p=0.1, repetition_penalty=1.2), greedy=True) == dict(
        do_sample=False
    )  # greedy: the logits' argmax, no control applies
    default = sampling_kwargs(SamplingConfig(), greedy=False)
    assert default == dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    kwargs = sampling_kwargs(SamplingConfig(top_k=7, min_p=0.1, repetition_penalty=2), greedy=False)
    assert (kwargs["top_k"], kwargs["min_p"], kwargs["repetition_penalty"]) == (7, 0.1, 2.0)
    assert isinstance(kwargs["repetition_penalty"], float)  # HF's processor refuses an int


def test_vllm_sampling_params_get_the_controls_as_trl_colocate_passes_them():
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.2,
                              max_new_tokens=32)  # fmt: skip
    assert sampling_params_kwargs(sampling, 4, 2, greedy=False) == dict(
        n=4, max_tokens=32, stop_token_ids=[2], temperature=0.7, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.2
    )
    off = sampling_params_kwargs(SamplingConfig(max_new_tokens=32), 4, 2, greedy=False)
    assert (off["top_k"], off["min_p"], off["repetition_penalty"]) == (0, 0.0, 1.0)  # vLLM's "off" values
    greedy = sampling_params_kwargs(sampling, 1, 2, greedy=True)
    assert greedy == dict(n=1, max_tokens=32, stop_token_ids=[2], temperature=0.0, top_p=1.0)


class Replay(Generator):
    """Returns one fixed rollout, whatever the sampling settings: the update alone differs between modules."""

    def __init__(self, rollout) -> None:
        self.rollout = rollout

    def generate(self, *args, **kwargs):
        return self.rollout


def rl_module(sampling: SamplingConfig) -> CorrPOModule:
    rl = RLConfig(steps=1, lr=1e-3, num_generations=G, sampling=sampling, rewards=["shaped_rewards:length"])
    return CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, rl=rl, seed=0)


def test_the_update_log_probs_are_on_logits_over_temperature_only(one_thread):
    """TRL's convention: top-k, min-p and the repetition penalty shape the rollout, not the loss. On the same
    rollout (sampled with them), modules that differ only in those controls take bit-identical updates; one with
    another temperature does not."""
    records = ArithmeticTask().records("train", 2)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    controls = SamplingConfig(temperature=0.9, top_k=5, min_p=0.1, repetition_penalty=1.5, max_new_tokens=8)
    torch.manual_seed(0)
    rollout = rl_module(controls).generate_rollout(prompts, G)
    weights = []
    for sampling in (controls, SamplingConfig(temperature=0.9, max_new_tokens=8),
                     SamplingConfig(temperature=0.6, max_new_tokens=8)):  # fmt: skip
        module = rl_module(sampling)
        module.generator = Replay(rollout)
        optimizer = torch.optim.AdamW(module.policy.parameters(), lr=module.rl.lr, weight_decay=0.0)
        result = module.grpo(module.rl_context(optimizer), prompts, answers, rl_index=0)
        assert [u.applied for u in result.updates] == [True]
        weights.append(torch.cat([p.detach().flatten() for p in module.policy.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[1], weights[2])  # the temperature does reach the loss


def test_hf_generator_applies_top_k_1_as_greedy():
    """The keywords reach ``model.generate``: sampling with ``top_k=1`` is the argmax, whatever the seed."""
    module = rl_module(SamplingConfig(max_new_tokens=6))
    prompts = [r["prompt"] for r in ArithmeticTask().records("test", 2)]
    module.generator = HFGenerator()
    greedy = module.generate_rollout(prompts, 2, greedy=True)
    torch.manual_seed(1)
    sampled = module.generate_rollout(prompts, 2, sampling=SamplingConfig(max_new_tokens=6, top_k=1, temperature=2.0))
    assert torch.equal(sampled.sequences, greedy.sequences)
