"""The GRPO update is TRL's: log-probs on ``logits / T``, unscorable rows left out, TRL's own loss where installed.

The slow references here need no TRL: the log-probs and entropies at temperature ``T`` token by token from an
explicit ``log_softmax(z / T)``, and an RL step's advantages with an all-``None`` row computed by hand. With TRL 1.16
installed (``requirements/trl.txt``), ``benchmarks/trl_parity.py``'s comparison runs on the settings that tell the
two conventions apart (temperature 0.7, KL with the top-entropy mask, bias-corrected KL over two iterations with the
clip active, a ``None`` row) against TRL's own ``GRPOTrainer``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_ARCH

from corrpo.data.arithmetic import ArithmeticTask
from corrpo.generation.rollout import SamplingConfig
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig
from corrpo.training.forward import completion_log_probs
from corrpo.training.reference_sync import mix_reference, sync_due

G = 4


def module_at(temperature: float, rewards: list[str], **rl) -> CorrPOModule:
    config = RLConfig(
        steps=2, lr=1e-3, num_generations=G, rewards=rewards,
        sampling=SamplingConfig(temperature=temperature, max_new_tokens=8), **rl,
    )  # fmt: skip
    return CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, rl=config, seed=0)


@pytest.mark.parametrize("packed", [False, True])
def test_log_probs_and_entropy_at_a_temperature_equal_log_softmax_of_scaled_logits_token_by_token(packed, one_thread):
    module = module_at(0.7, ["format"])
    prompts = [r["prompt"] for r in ArithmeticTask().records("train", 2)]
    torch.manual_seed(0)
    rollout = module.generate_rollout(prompts, G)
    log_probs, entropy = completion_log_probs(module.policy, rollout, packed=packed, temperature=0.7)
    P = rollout.prompt_length
    position_ids = (rollout.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = module.policy(
            rollout.sequences, attention_mask=rollout.attention_mask, position_ids=position_ids
        ).logits
    checked = 0
    for i, j in rollout.completion_mask.nonzero().tolist():
        logp = torch.log_softmax(logits[i, P + j - 1].double() / 0.7, dim=-1)
        assert log_probs[i, j].item() == pytest.approx(logp[rollout.sequences[i, P + j]].item(), abs=2e-5)
        assert entropy[i, j].item() == pytest.approx(-(logp.exp() * logp).sum().item() / math.log(2), abs=2e-5)
        checked += 1
    assert checked > 10
    raw = completion_log_probs(module.policy, rollout, packed=packed)[0]
    assert (raw - log_probs)[rollout.completion_mask].abs().max() > 1e-3  # T = 0.7 is not the raw logits


def test_an_all_none_row_is_left_out_of_its_group_and_gets_advantage_zero(one_thread):
    """``rl.unscorable_rewards: skip`` (TRL's): the row's reward is NaN, its group's baseline and std are those of
    the other rows, its advantage 0; ``zero`` scores it 0 like any sample."""
    records = ArithmeticTask().records("train", 2)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    for mode in ("skip", "zero"):
        module = module_at(1.0, ["shaped_rewards:none_on_third"], unscorable_rewards=mode)
        optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.0)
        torch.manual_seed(3)
        result = module.grpo(module.rl_context(optimizer), prompts, answers, rl_index=0)
        scores = result.scores.per_function["none_on_third"]
        assert scores[2].isnan() and scores[6].isnan()
        if mode == "skip":
            assert result.rewards[2].isnan() and result.advantages[2] == 0 and result.advantages[6] == 0
            for group in range(2):
                rows = [i for i in range(group * G, group * G + G) if i % G != 2]
                r = torch.tensor([scores[i].item() for i in rows], dtype=torch.float64)
                expected = (r - r.mean()) / (r.std() + 1e-4)
                expected = torch.where((r - r.mean()) == 0, 0.0, expected)
                torch.testing.assert_close(result.advantages[rows].double(), expected, atol=1e-5, rtol=1e-5)
            assert result.metrics["reward"].item() == pytest.approx(scores[~scores.isnan()].mean().item(), abs=1e-6)
        else:
            assert result.rewards[2] == 0 and not result.rewards.isnan().any()


def test_the_logged_entropy_is_in_nats_and_the_bits_are_kept_under_inversion(one_thread):
    module = module_at(1.0, ["format"])
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.0)
    prompts = [r["prompt"] for r in ArithmeticTask().records("train", 2)]
    result = module.grpo(module.rl_context(optimizer), prompts, ["0", "0"], rl_index=0)
    bits = result.metrics["inversion/policy_entropy_bits"]
    assert float(bits) > 0.1
    assert float(result.metrics["entropy"]) == pytest.approx(float(bits) * math.log(2), rel=1e-6)


PEER_SETTINGS = (
    "2 iterations grpo beta=0.04 bc-KL T=0.7",
    "top_entropy_quantile=0.5 beta=0.04 T=0.7",
    "a None reward row T=0.7",
    "scale_rewards=none T=1.0",
    "GSPO 2 iterations beta=0.04 bc-KL T=0.7",
    "entropy_coef=0.05 top_entropy_quantile=0.5 T=0.7",
    "sync_ref_model every update, 2 batches T=0.7",
)


def test_the_update_equals_trls_grpo_trainer_loss_and_gradient(tmp_path, one_thread):
    """TRL 1.16's own scoring and loss on the same tokens, rewards and weights (skipped without TRL)."""
    pytest.importorskip("trl")
    import trl_parity

    folder = tmp_path / "policy"
    trl_parity.export_policy(folder)
    by_name = {s.name: s for s in trl_parity.settings()}
    clipped = 0.0
    for name in PEER_SETTINGS:
        for loss_gap, grad_gap, clip in trl_parity.compare(folder, by_name[name], tmp_path / "trl"):
            assert loss_gap <= 1e-6 and grad_gap <= 1e-5, (name, loss_gap, grad_gap)
            clipped = max(clipped, clip)
    assert clipped > 0.05  # the second iteration's clip was active: the ratio path is compared, not only ratio 1


def test_reference_sync_mixes_alpha_of_the_policy_into_the_reference_every_tau_updates():
    torch.manual_seed(5)
    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in reference.parameters()]
    mix_reference(policy, reference, 0.6)
    for new, old, p in zip(reference.parameters(), before, policy.parameters(), strict=True):
        torch.testing.assert_close(new, 0.4 * old + 0.6 * p, rtol=0, atol=1e-7)
    assert [k for k in range(1, 10) if sync_due(k, 4)] == [4, 8] and not sync_due(0, 1)
    with pytest.raises(ValueError, match="rl.sync_ref_model is true but rl.beta is 0"):
        RLConfig(sync_ref_model=True)


def test_reference_sync_is_trls_sync_target_model_bit_for_bit():
    trl = pytest.importorskip("trl")
    from trl.trainer.callbacks import SyncRefModelCallback

    torch.manual_seed(6)
    policy, ours, theirs = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    mix_reference(policy, ours, 0.3)
    SyncRefModelCallback._sync_target_model(policy, theirs, 0.3)
    assert trl.__version__ == "1.16.0"
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
