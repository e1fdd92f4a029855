"""Finite or stopped (issue 28, item 1): no config number is NaN/inf from YAML or the command line, an update that
makes the weights non-finite stops the run, a streak of skipped updates stops it, skipped updates still count as
steps, and nothing non-finite is checkpointed, exported or loaded unnoticed."""

import math
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import REPO, TINY_ARCH

from callbacks.checkpoint import ResumableCheckpoint
from corrpo.cli import build_cli
from corrpo.data.arithmetic import ArithmeticTask
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.generation.rollout import SamplingConfig
from corrpo.models.finite import NonFiniteWeightsError, nonfinite_fields, nonfinite_tensors
from corrpo.models.loading import TinyArchitecture, export_policy, load_policy
from corrpo.models.lora import LoRAConfig
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig, SFTConfig
from corrpo.training.evaluation import EvalConfig
from corrpo.training.update import SkippedUpdatesError, SkipStreak, UpdateOutcome, apply_update

INF, NAN = math.inf, math.nan


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: SFTConfig(lr=INF), "sft.lr must be a finite number"),
        (lambda: SFTConfig(weight_decay=NAN), "sft.weight_decay must be a finite number"),
        (lambda: SFTConfig(weight_decay=-0.1), "sft.weight_decay must be >= 0"),
        (lambda: SFTConfig(max_consecutive_skipped_updates=-1), "sft.max_consecutive_skipped_updates must be >= 0"),
        (lambda: RLConfig(lr=1e400), "rl.lr must be a finite number"),
        (lambda: RLConfig(reward_weights=[NAN, 1.0]), "rl.reward_weights[0] must be a finite number"),
        (lambda: RLConfig(delta=INF), "rl.delta must be a finite number"),
        (lambda: SamplingConfig(temperature=NAN), "rl.sampling.temperature must be a finite number"),
        (lambda: SamplingConfig(top_p=NAN), "rl.sampling.top_p must be a finite number"),
        (lambda: EvalConfig(temperature=INF), "eval.temperature must be a finite number"),
        (lambda: LoRAConfig(alpha=INF), "model.lora.alpha must be a finite number"),
        (lambda: TinyArchitecture(rope_theta=NAN), "model.tiny.rope_theta must be a finite number"),
    ],
)
def test_a_non_finite_or_invalid_config_number_is_an_error_naming_its_key(build, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        build()


def test_nonfinite_fields_names_nested_keys_and_list_items_but_not_user_kwargs():
    config = {"model": {"rl": {"lr": 1.0, "reward_weights": [1.0, INF], "rewards": [{"kwargs": {"cap": INF}}]}}}
    assert nonfinite_fields(config) == ["model.rl.reward_weights[1]=inf"]


@pytest.mark.parametrize("how", ["yaml", "command line"])
def test_inf_lr_is_refused_the_same_from_yaml_and_the_command_line_before_any_run_folder(how, tmp_path, capsys):
    """``lr: .inf`` in a YAML file used to pass (``inf > 0``) where ``--model.sft.lr=inf`` failed to parse."""
    source = tmp_path / "inf.yaml"
    source.write_text("model:\n  sft:\n    lr: .inf\n")
    args = ["--config", str(source)] if how == "yaml" else ["--model.sft.lr=.inf"]
    root = tmp_path / "runs"
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), *args, f"--trainer.default_root_dir={root}"])
    assert "model.sft.lr must be a finite number, got inf" in capsys.readouterr().err
    assert not root.exists() or not any(root.iterdir())


# ---------------------------------------------------------------------------------------------- tensors
def test_nonfinite_tensors_is_exact_skips_integers_and_survives_an_overflowing_norm():
    huge = torch.full((64,), 60000.0, dtype=torch.float16)  # finite, but its fp16 norm overflows to inf
    nan, inf = torch.zeros(3), torch.ones(2, 2)
    nan[1], inf[0, 0] = NAN, -INF
    named = [("huge", huge), ("nan", nan), ("ints", torch.tensor([1, 2])), ("inf", inf), ("empty", torch.empty(0))]
    assert nonfinite_tensors(named) == ["nan", "inf"]


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _loss(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.ones(2, 4)).pow(2).sum()


def test_an_update_that_makes_the_weights_non_finite_stops_naming_lr_and_the_tensor():
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(NonFiniteWeightsError, match=r"lr=inf.*'weight'.*learning rate"):
        apply_update(_loss(model), optimizer, model, lr=INF, max_grad_norm=1.0)


def test_a_skip_over_weights_that_are_already_nan_stops_naming_the_tensor_instead_of_skipping_forever():
    model = _linear()
    with torch.no_grad():
        model.bias[0] = NAN
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteWeightsError, match=r"already hold NaN or inf \('bias'\)"):
        apply_update(_loss(model), optimizer, model, lr=0.1, max_grad_norm=1.0)


def test_a_skip_over_finite_weights_is_still_a_skip():
    model = _linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update = apply_update(_loss(model) * NAN, torch.optim.SGD(model.parameters(), lr=0.1), model, 0.1, 1.0)
    assert not update.applied and "non-finite loss" in update.skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_streak_of_skipped_updates_stops_at_the_configured_limit_and_an_applied_one_resets_it():
    streak, config = SkipStreak(), SFTConfig(max_consecutive_skipped_updates=2)
    skipped, applied = UpdateOutcome(applied=False, skipped="non-finite loss nan"), UpdateOutcome(applied=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert streak.record(skipped, config, "sft", 1) == 1
        assert streak.record(applied, config, "sft", 2) == 0
        assert streak.record(skipped, config, "sft", 3) == 1
        with pytest.raises(SkippedUpdatesError, match=r"2 updates in a row.*sft.max_consecutive_skipped_updates=2"):
            streak.record(skipped, config, "sft", 4)
        never = SkipStreak()
        assert sum(never.record(skipped, SFTConfig(max_consecutive_skipped_updates=0), "sft", i) for i in range(9)) == 9


# ---------------------------------------------------------------------------------------------- a run
class _NaNAt(L.Callback):
    """Writes a NaN into one weight as SFT step ``at`` starts (memory corruption, a buggy hook)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch["step"] == self.at:
            with torch.no_grad():
                pl_module.policy.model.layers[0].mlp.up_proj.weight[0, 0] = NAN


def _fit(tmp_path, callbacks, steps: int = 3, **sft) -> tuple[CorrPOModule, L.Trainer]:
    module = CorrPOModule(tiny=TINY_ARCH, sft=SFTConfig(steps=steps, lr=1e-3, max_length=64, **sft))
    data = ReasoningDataModule(arithmetic=ArithmeticTask(), n_train=100, sft_steps=steps, sft_batch_size=4, n_test=4,
                               n_probe=4)  # fmt: skip
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return module, trainer


def test_a_nan_weight_mid_run_stops_it_and_no_checkpoint_or_export_holds_a_non_finite_tensor(tmp_path):
    checkpoints = ResumableCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_last=True,
                                      save_top_k=-1)  # fmt: skip
    with pytest.raises(NonFiniteWeightsError, match=r"already hold NaN or inf \('model.layers.0.mlp.up_proj.weight'\)"):
        _fit(tmp_path, [checkpoints, _NaNAt(2)])
    saved = sorted(tmp_path.rglob("*.ckpt"))
    assert saved  # the steps before the NaN were checkpointed ...
    for path in saved:  # ... and every one is finite
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert nonfinite_tensors(state.items()) == [], path
    assert not (tmp_path / "policy").exists() and not (tmp_path / "results.json").exists()


def test_a_streak_of_skipped_updates_stops_the_fit_naming_the_key(tmp_path):
    class _NaNLoss(L.Callback):  # the logits become NaN from step 1 on: every update is skipped
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch["step"] == 1:
                pl_module.policy.lm_head.register_forward_hook(lambda m, i, out: out * NAN)

    with pytest.raises(SkippedUpdatesError, match=r"sft.max_consecutive_skipped_updates=2"):
        _fit(tmp_path, [_NaNLoss()], steps=4, max_consecutive_skipped_updates=2)


def test_the_checkpoint_callback_refuses_a_non_finite_state_dict():
    trainer = SimpleNamespace(global_step=5, strategy=SimpleNamespace(reduce_boolean_decision=lambda ok, all: ok))
    state = {"policy.w": torch.tensor([1.0, NAN]), "step": torch.tensor(3)}
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to save a checkpoint at global step 5.*'policy.w'"):
        ResumableCheckpoint().on_save_checkpoint(trainer, None, {"state_dict": state})
    ResumableCheckpoint().on_save_checkpoint(trainer, None, {"state_dict": {"policy.w": torch.ones(2)}})


# ------------------------------------------------------------------------------------------ export, load
def test_export_refuses_a_nan_policy_and_load_names_the_file_and_tensor_of_one(tmp_path):
    model, tokenizer = load_policy("tiny-qwen2", TINY_ARCH)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = INF
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to write the policy.*'model.layers.1.self_attn.o_proj"):
        export_policy(model, tokenizer, tmp_path / "policy")
    assert not (tmp_path / "policy").exists()
    folder = tmp_path / "handmade"  # a folder written by other means
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(NonFiniteWeightsError, match=r"model.layers.1.self_attn.o_proj.weight.*model.safetensors"):
        load_policy(str(folder))
