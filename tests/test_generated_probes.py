"""``InversionTracker(source="generated")`` scores exactly the tokens the policy generated.

A greedy completion cut at ``max_new_tokens`` has no eos: the probe must not invent one, and must not
re-tokenise decoded text (which can split differently from what was sampled).
"""

from types import SimpleNamespace

import torch
from conftest import TINY_ARCH

from callbacks.inversion import InversionTracker
from corrpo.data.arithmetic import ArithmeticTask
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig, SamplingConfig


def test_generated_probes_are_the_sampled_tokens_with_no_eos_added_to_truncated_ones(one_thread):
    module = CorrPOModule(tiny=TINY_ARCH, rl=RLConfig(sampling=SamplingConfig(max_new_tokens=5)), seed=3)
    data = ReasoningDataModule(arithmetic=ArithmeticTask(), n_train=40, n_test=4, n_probe=6)
    trainer = SimpleNamespace(datamodule=data, global_rank=0, world_size=1)
    tracker = InversionTracker(source="generated", batch_size=4)

    batches = list(tracker._probe_batches(trainer, module))
    prompts = [r["prompt"] for r in data.probe_records()]
    expected = [module.generate_rollout(prompts[i : i + 4], 1, greedy=True) for i in range(0, len(prompts), 4)]
    assert len(batches) == len(expected) == 2

    eos = module.tokenizer.eos_token_id
    truncated = 0
    for batch, rollout in zip(batches, expected, strict=True):
        assert torch.equal(batch["input_ids"], rollout.sequences)
        for row in range(rollout.sequences.shape[0]):
            scored = batch["input_ids"][row][batch["loss_mask"][row]].tolist()
            sampled = rollout.completion_ids[row][rollout.completion_mask[row]].tolist()
            assert scored == sampled
            if rollout.truncated[row]:
                truncated += 1
                assert len(scored) == 5 and eos not in scored
    assert truncated > 0, "an untrained policy should hit max_new_tokens, or this test checks nothing"
