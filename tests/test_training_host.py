"""The module-callback contract: the phase schedule's one boundary predicate, and start-up errors for gaps."""

from __future__ import annotations

import lightning as L
import pytest

from callbacks.dashboard import WandbDashboard
from callbacks.inversion import InversionTracker
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.training.host import HOST_ATTRIBUTES, TrainingHost, require_host
from corrpo.training.phases import PhaseSchedule


def test_the_boundary_is_the_first_rl_batch_after_sft():
    schedule = PhaseSchedule(sft_steps=3, rl_steps=2)
    assert [schedule.phase_at(i) for i in range(5)] == ["sft", "sft", "sft", "rl", "rl"]
    assert [schedule.is_boundary(i) for i in range(6)] == [False, False, False, True, False, False]
    assert schedule.total == 5 and schedule.rl_index(4) == 1 and schedule.boundary_step == 3


@pytest.mark.parametrize(("sft", "rl"), [(0, 4), (4, 0)])
def test_a_run_with_one_phase_has_no_boundary(sft, rl):
    schedule = PhaseSchedule(sft_steps=sft, rl_steps=rl)
    assert not any(schedule.is_boundary(i) for i in range(sft + rl + 1))
    assert schedule.starts_rl(0) == (sft == 0) and schedule.boundary_step is None


class NotAHost(L.LightningModule):
    """A LightningModule with a policy but none of the rest."""

    def __init__(self):
        super().__init__()
        self.policy = None


@pytest.mark.parametrize("callback", [InversionTracker(), WandbDashboard()], ids=["tracker", "dashboard"])
def test_a_callback_on_a_module_missing_the_contract_fails_at_setup_naming_the_gaps(callback):
    with pytest.raises(TypeError, match=rf"{type(callback).__name__} needs .*lacks schedule, steps_done"):
        callback.setup(None, NotAHost(), "fit")


def test_the_data_module_reads_steps_done_through_the_contract():
    from types import SimpleNamespace

    datamodule = ReasoningDataModule(sft_steps=2, rl_steps=0)
    datamodule.trainer = SimpleNamespace(lightning_module=NotAHost(), global_rank=0, world_size=1)
    assert "steps_done" in HOST_ATTRIBUTES
    with pytest.raises(TypeError, match="ReasoningDataModule needs .*lacks schedule, steps_done"):
        datamodule.train_dataloader()


def test_the_corrpo_module_implements_the_contract():
    from conftest import TINY_ARCH

    from corrpo.module import CorrPOModule

    module = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH)
    assert require_host(module, "test") is module and isinstance(module, TrainingHost)
    assert module.schedule == PhaseSchedule(module.sft.steps, module.rl.steps)
