"""Padding-free (packed) forwards against the padded forward they replace: the row packing, the logits of every
listed family, a model that ignores packed positions (it falls back), and whole SFT and RL steps (SGD, so a
weight change is the gradient itself)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import TINY_ARCH

import corrpo.models.packing
from corrpo.data.arithmetic import ArithmeticTask
from corrpo.generation.rollout import SamplingConfig
from corrpo.models.packing import (
    PackedBatch,
    first_fit_decreasing,
    forward_logits,
    packed_width,
    packing_unsupported_reason,
)
from corrpo.models.tiny_families import TINY_FAMILY_NAMES, random_family_model
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig, SFTConfig
from corrpo.training.sft import SFTContext, sft_step

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, T = 64, 12


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Six rows of ``T`` random ids, left and right padded by different amounts (2 to 12 real tokens), so several
    rows share a packed row."""
    ids = torch.randint(0, VOCAB, (6, T), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(6, T, dtype=torch.long)
    for row, (left, right) in enumerate([(0, 0), (4, 0), (0, 7), (3, 5), (9, 1), (0, 10)]):
        mask[row, left : T - right] = 1
    return ids, mask


def test_first_fit_decreasing_places_every_sequence_once_within_the_width():
    lengths = [7, 2, 5, 5, 3, 1, 4, 6]
    rows = first_fit_decreasing(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    # by hand: 7+1 | 6+2 | 5+3 | 5 +... 4 does not fit 5's 3 free slots: 5 | 4
    assert rows == [[0, 5], [7, 1], [2, 4], [3], [6]]
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([9], 8)


def test_packed_width_widens_rows_only_when_they_pack_enough_to_pay_for_longer_attention():
    # equal lengths leave no padding to remove: a wider row would only attend further
    assert packed_width([40] * 32, hidden_size=128) == (40, [[i] for i in range(32)])
    # one 50 and fifteen 30s, cost rows * width * (1 + width / 768): 1x = 16 rows of 50 (852), 1.5x = 9 rows of 75
    # (741), 2x = 6 rows of 100 (678: 50+30 and five rows of three 30s), 3x = 4 rows of 150 (717)
    width, rows = packed_width([50] + [30] * 15, hidden_size=128)
    assert (width, len(rows)) == (100, 6)


def test_pack_then_unpack_puts_every_real_token_back_and_zeros_at_pads():
    ids, mask = padded_batch()
    packed = PackedBatch.build(ids, mask, hidden_size=32)
    assert packed.input_ids.numel() < ids.numel() and packed.source.numel() == int(mask.sum())
    back = packed.unpack(packed.input_ids)
    assert torch.equal(back[mask.bool()], ids[mask.bool()]) and (back[~mask.bool()] == 0).all()
    assert torch.equal(packed.unpack(packed.input_ids, keep=5), back[:, -5:])
    # each packed segment's positions restart at 0 and count that sequence's real tokens
    positions = packed.unpack(packed.position_ids)
    assert torch.equal(positions[mask.bool()], ((mask.cumsum(1) - 1).clamp(min=0))[mask.bool()])


# gpt-oss builds its masks without position_ids (transformers 5.24), so packed rows would attend across sequences
PACKING_REFUSED = {"gpt_oss": "change with its neighbour"}


@pytest.mark.parametrize("family", sorted(PACKING_REFUSED))
def test_a_family_whose_packed_rows_leak_is_refused_saying_why_and_trains_padded(family):
    model = random_family_model(family, VOCAB, TINY_ARCH)
    ids, mask = padded_batch()
    assert PACKING_REFUSED[family] in packing_unsupported_reason(model)
    with torch.no_grad():
        assert torch.equal(forward_logits(model, ids, mask, packed=True), forward_logits(model, ids, mask))


@pytest.mark.parametrize("family", [f for f in TINY_FAMILY_NAMES if f not in PACKING_REFUSED])
def test_packed_logits_equal_padded_logits_at_every_real_position_for_every_family(family):
    model = random_family_model(family, VOCAB, TINY_ARCH)
    ids, mask = padded_batch()
    assert packing_unsupported_reason(model) is None, family
    with torch.no_grad():
        for keep in (0, 7):
            padded, packed = forward_logits(model, ids, mask, keep), forward_logits(model, ids, mask, keep, packed=True)
            real = mask.bool()[:, -keep:] if keep else mask.bool()
            assert padded.shape == packed.shape
            err = (padded - packed)[real].abs().max() / padded[real].abs().max()
            assert err < 1e-5, (family, keep, float(err))


class _DropsPositions(torch.nn.Module):
    """A wrapper that forwards everything but ``position_ids``: packed rows then run as one long sequence each."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)


def test_a_bf16_model_passes_the_packing_check_and_its_packed_logits_round_like_its_padded_ones():
    model = random_family_model("qwen2", VOCAB, TINY_ARCH).to(torch.bfloat16)
    ids, mask = padded_batch()
    assert packing_unsupported_reason(model) is None
    with torch.no_grad():
        padded, packed = forward_logits(model, ids, mask).float(), forward_logits(model, ids, mask, packed=True).float()
    real = mask.bool()
    assert (padded - packed)[real].abs().max() / padded[real].abs().max() < 64 * torch.finfo(torch.bfloat16).eps


def test_the_packing_check_runs_in_eval_mode_so_dropout_does_not_switch_packing_off_and_the_mode_is_kept():
    model = random_family_model("qwen2", VOCAB, TINY_ARCH)
    model.config.attention_dropout = 0.5
    model.train()
    assert packing_unsupported_reason(model) is None and model.training


def test_a_model_that_ignores_packed_positions_falls_back_to_the_padded_forward_with_a_warning(caplog):
    model = _DropsPositions(random_family_model("qwen2", VOCAB, TINY_ARCH))
    ids, mask = padded_batch()
    with caplog.at_level(logging.WARNING, logger="corrpo.models.packing"):
        reason = packing_unsupported_reason(model)
    assert reason is not None and "change with its neighbour" in reason and "packing is off" in caplog.text
    with torch.no_grad():
        assert torch.equal(forward_logits(model, ids, mask, packed=True), forward_logits(model, ids, mask))


def _sgd_delta(module: CorrPOModule, run) -> list[torch.Tensor]:
    """The weight change of one step of ``run(optimizer)`` under SGD at lr 1 (no clip): minus the gradient."""
    before = [p.detach().clone() for p in module.policy.parameters()]
    run(torch.optim.SGD(module.policy.parameters(), lr=1.0))
    return [p.detach() - b for p, b in zip(module.policy.parameters(), before, strict=True)]


def _assert_same_gradients(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    scale = max(x.abs().max() for x in a)
    assert scale > 1e-4  # the step moved the weights
    assert max((x - y).abs().max() for x, y in zip(a, b, strict=True)) / scale < 1e-5


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_a_packed_sft_step_is_the_padded_step(micro_batch_size, packings, monkeypatch):
    monkeypatch.setattr(
        corrpo.models.packing, "WIDTH_FACTORS", (2.0,)
    )  # rows of twice the longest: near-equal traces pack
    records = ArithmeticTask().records("train", 8)
    prompts, completions = [r["prompt"] for r in records], [r["completion"] for r in records]
    deltas, losses = [], []
    for packing in (False, True):
        sft = SFTConfig(steps=2, lr=1.0, max_grad_norm=0.0, max_length=64, micro_batch_size=micro_batch_size,
                        packing=packing)  # fmt: skip
        module = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, sft=sft, seed=0)
        module.policy.train()

        def run(optimizer, module=module, sft=sft):
            context = SFTContext(module.policy, module.tokenizer, optimizer)
            losses.append(float(sft_step(context, sft, prompts, completions, 0).loss))

        deltas.append(_sgd_delta(module, run))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    _assert_same_gradients(*deltas)
    assert any(rows < n for n, rows in packings if n > 2)  # the step packed (2 sequences: the packing check)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_a_packed_rl_step_is_the_padded_step(beta, packings, monkeypatch):
    monkeypatch.setattr(corrpo.models.packing, "WIDTH_FACTORS", (2.0,))
    records = ArithmeticTask().records("train", 3)
    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    deltas, results = [], []
    for packing in (False, True):
        rl = RLConfig(
            steps=2, lr=1.0, max_grad_norm=0.0, num_generations=4, sampling=SamplingConfig(max_new_tokens=12),
            rewards=["shaped_rewards:length"], beta=beta, packing=packing,
        )  # fmt: skip
        module = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, rl=rl, seed=0)

        def run(optimizer, module=module):
            torch.manual_seed(7)
            results.append(module.grpo(module.rl_context(optimizer), prompts, answers, rl_index=0))

        deltas.append(_sgd_delta(module, run))
    padded, packed = results
    assert torch.equal(padded.rewards, packed.rewards) and padded.advantages.abs().max() > 0.1
    assert float(padded.metrics["entropy"]) == pytest.approx(float(packed.metrics["entropy"]), rel=1e-5)
    _assert_same_gradients(*deltas)
    assert any(rows < n for n, rows in packings if n > 2)  # the step packed (2 sequences: the packing check)


def test_packing_is_a_config_key_of_both_phases_and_on_by_default():
    assert SFTConfig().packing and RLConfig().packing
    assert {f.name for f in dataclasses.fields(SFTConfig)} >= {"packing"}
