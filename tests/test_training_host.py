"""The contracts between module, data module and callbacks: the phase schedule's one boundary predicate, start-up
errors naming the gaps of a module or a data module, and the one even-split check across processes."""

from __future__ import annotations

import lightning as L
import pytest

from callbacks.dashboard import WandbDashboard
from callbacks.inversion import InversionTracker
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.training.host import (
    HELD_OUT_ATTRIBUTES,
    HOST_ATTRIBUTES,
    HeldOutData,
    TrainingHost,
    require_even_split,
    require_held_out_data,
    require_host,
)
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


def test_the_data_module_implements_the_held_out_data_contract():
    datamodule = ReasoningDataModule()
    assert set(HELD_OUT_ATTRIBUTES) == {"seed", "fields", "test_records", "probe_records", "rl_records"}
    assert require_held_out_data(datamodule, "test") is datamodule and isinstance(datamodule, HeldOutData)


def test_a_missing_or_partial_data_module_fails_at_setup_naming_the_gaps():
    from types import SimpleNamespace

    from conftest import TINY_ARCH

    from corrpo.module import CorrPOModule

    with pytest.raises(TypeError, match="InversionTracker needs a data module .*NoneType lacks seed, fields"):
        InversionTracker().setup(SimpleNamespace(datamodule=None), host_stub(), "fit")
    module = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(seed=0, test_records=list))
    with pytest.raises(TypeError, match="CorrPOModule needs .*HeldOutData.*lacks fields, probe_records"):
        module.setup("fit")
    module._trainer = SimpleNamespace(datamodule=None, fast_dev_run=False)  # no data module: nothing to evaluate on
    module.setup("fit")
    assert module.evaluate_and_log("start") is None and module.seeds()["data"] is None


def test_one_even_split_check_names_the_setting_and_the_process_count():
    require_even_split("data.n_test", 8, 4)
    with pytest.raises(ValueError, match=r"^data.rl_batch_size=2 must be divisible by the number of processes \(4\)$"):
        require_even_split("data.rl_batch_size", 2, 4)
    with pytest.raises(ValueError, match=r"data.n_probe=3 must be divisible .* \(2\) under FSDP2: every rank"):
        require_even_split("data.n_probe", 3, 2, "under FSDP2: every rank must score the same number of batches")


def host_stub():
    """A module offering every part of TrainingHost (the tracker then checks the data module)."""
    from types import SimpleNamespace

    return SimpleNamespace(**(dict.fromkeys(HOST_ATTRIBUTES) | {"schedule": PhaseSchedule(1, 1)}))
