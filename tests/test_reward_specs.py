"""Rewards from anywhere: factories with kwargs from YAML, verl's compute_score, reward models, and the dry run.

The functions below are resolved by import path (``test_reward_specs:make_near``), as a user's would be.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import REPO, TINY_FAST_ARGS
from reward_inputs import reward_inputs

from corrpo.rewards import RewardSpec, parse_reward_spec, reward_functions
from corrpo.rewards.call import group_inputs
from corrpo.rewards.combine import score_completions
from corrpo.rewards.dry_run import RewardDryRunError, dry_run_rewards
from corrpo.rewards.reward_model import RewardModel, place_rewards
from corrpo.rewards.verl import VerlReward
from corrpo.training.config import RLConfig

SEEN: dict[str, list] = {"verl": []}


def make_near(target, scale=1.0):
    """A factory, as TRL's get_soft_overlong_punishment: its arguments come from YAML ``kwargs``."""

    def near(completions, **kwargs):
        return [-scale * abs(target - len(c)) for c in completions]

    return near


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature: one sample, a float or a dict holding ``score``."""
    SEEN["verl"].append((data_source, solution_str, ground_truth, extra_info))
    if data_source == "dict":
        return {"score": float(ground_truth in solution_str), "acc": ground_truth in solution_str}
    return float(ground_truth in solution_str)


def always_raises(completions, **kwargs):
    raise RuntimeError("verifier service unreachable")


def wrong_length(completions, **kwargs):
    return [0.0]


def all_inf(completions, **kwargs):
    return [math.inf] * len(completions)


def unscorable(completions, **kwargs):
    return [None] * len(completions)


def raises_on_empty(completions, **kwargs):
    return [1.0 / len(c) for c in completions]  # ZeroDivisionError on the empty placeholder only


def _cli(tmp_path, *extra):
    from corrpo.cli import build_cli

    args = ["--config", str(REPO / "configs" / "tiny.yaml"), *TINY_FAST_ARGS]  # run=False: no subcommand
    args += [f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *extra]
    return build_cli(args, run=False)


# ------------------------------------------------------------------------------------------ the forms
def test_a_yaml_list_mixing_strings_and_mappings_builds_each_reward_through_the_cli(tmp_path):
    config = tmp_path / "rewards.yaml"
    config.write_text(
        "model:\n  rl:\n    reward_weights: [1.0, 0.5, 1.0]\n    rewards:\n      - accuracy\n"
        "      - {function: 'test_reward_specs:make_near', kwargs: {target: 5, scale: 2.0}, name: near5}\n"
        "      - function: test_reward_specs:compute_score\n        style: verl\n"
    )
    cli = _cli(tmp_path, "--config", str(config))
    fns = cli.model.grpo.reward_fns
    assert list(fns) == ["accuracy", "near5", "compute_score"]
    assert fns["near5"](completions=["abc", "abcdefg"]) == [-4.0, -4.0]
    assert isinstance(fns["compute_score"], VerlReward)
    assert cli.model.rl.rewards[1] == {"function": "test_reward_specs:make_near", "kwargs": {"target": 5, "scale": 2.0},
                                       "name": "near5"}  # fmt: skip


def test_trl_soft_overlong_punishment_is_built_from_kwargs_on_the_command_line(tmp_path):
    pytest.importorskip("trl")
    cli = _cli(
        tmp_path,
        "--model.rl.rewards=[accuracy, {function: 'trl.rewards:get_soft_overlong_punishment', "
        "kwargs: {max_completion_len: 24, soft_punish_cache: 8}, name: overlong}]",
        "--model.rl.reward_weights=[1.0, 1.0]",
    )
    overlong = cli.model.grpo.reward_fns["overlong"]
    inputs = reward_inputs(["p"] * 3, ["a", "b", "c"], ["1"] * 3, completion_ids=[[1] * 10, [1] * 20, [1] * 30])
    assert score_completions({"overlong": overlong}, [1.0], inputs).total.tolist() == [0.0, -0.5, -1.0]


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"function": "accuracy", "kwarg": {}}, "rl.rewards[1].kwarg: unknown key 'kwarg'"),
        ({"function": "accuracy", "kwargs": [1, 2]}, "rl.rewards[1].kwargs: expected a mapping"),
        ({"function": "accuracy", "model": "m"}, "rl.rewards[1]: give exactly one of 'function' and 'model'"),
        ({"model": "m", "style": "verl"}, "rl.rewards[1].style: 'style' does not apply to a reward model"),
        ({"function": "accuracy", "ground_truth": "x"}, "rl.rewards[1].ground_truth: 'ground_truth' does not apply"),
        ({"function": "accuracy", "style": "openrlhf"}, "rl.rewards[1].style: expected one of ['trl', 'verl']"),
        ({"model": "m", "batch_size": 0}, "rl.rewards[1].batch_size: expected a positive int"),
        ({"model": "m", "dtype": "fp8"}, "rl.rewards[1].dtype"),
        ({"function": ""}, "rl.rewards[1].function: expected a non-empty string"),
        (3, "rl.rewards[1]: got int"),
    ],
)
def test_a_wrong_entry_names_its_key_and_lists_the_accepted_forms(entry, named):
    with pytest.raises(ValueError) as info:
        RLConfig(rewards=["format", entry], reward_weights=[1.0, 1.0])
    assert named in str(info.value) and "{function, kwargs, name, style}" in str(info.value)


def test_a_wrong_entry_on_the_command_line_names_its_key_before_training(tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as info:
        _cli(
            tmp_path,
            "--model.rl.rewards=[accuracy, {function: format, kwarg: {x: 1}}]",
            "--model.rl.reward_weights=[1, 1]",
        )
    assert "rl.rewards[1].kwarg" in str(info.value) + capsys.readouterr().err


def test_a_factory_that_fails_or_returns_no_callable_is_an_error_naming_kwargs():
    with pytest.raises(
        ValueError, match=r"rl.rewards\[0\].kwargs: building the reward .*make_near.*unexpected keyword"
    ):
        reward_functions([{"function": "test_reward_specs:make_near", "kwargs": {"target": 1, "size": 2}}])
    with pytest.raises(ValueError, match=r"rl.rewards\[0\].kwargs: .*returned float, not a reward function"):
        reward_functions([{"function": "test_reward_specs:float_factory", "kwargs": {}}])
    with pytest.raises(ValueError, match=r"rl.rewards\[1\].function: cannot import reward 'nowhere:fn'"):
        reward_functions(["accuracy", {"function": "nowhere:fn"}])


def float_factory():
    return 1.0


def test_a_spec_object_and_a_plain_string_give_the_same_reward():
    assert parse_reward_spec("accuracy") == RewardSpec(function="accuracy")
    spec = RewardSpec(function="test_reward_specs:make_near", kwargs={"target": 2}, name="n2")
    assert parse_reward_spec(spec) == spec
    assert list(reward_functions(["format", spec])) == ["format", "n2"]


# ------------------------------------------------------------------------------------------------ verl
def test_the_verl_adapter_passes_data_source_text_ground_truth_and_extra_info_per_sample():
    reward = VerlReward(compute_score, name="v")
    SEEN["verl"].clear()
    prompts = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "3+3?"}]]
    inputs = group_inputs(
        prompts, ["4", "6"], {"data_source": ["gsm8k", None], "extra_info": [{"index": 0}, {"index": 1}]},
        ["it is 4", "five", "6!", ""], 2,
    )  # fmt: skip
    assert isinstance(inputs.completions[0], list)  # conversational: assistant message lists, read as their text
    scores = score_completions({"v": reward}, [1.0], inputs)
    assert scores.total.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert SEEN["verl"][0] == ("gsm8k", "it is 4", "4", {"index": 0})
    assert SEEN["verl"][2] == ("corrpo", "6!", "6", {"index": 1})  # no data_source: the configured default


def test_the_verl_adapter_reads_a_dict_score_a_nested_ground_truth_and_logs_the_other_keys():
    from corrpo.rewards.call import RewardLog

    fns = reward_functions(
        [{"function": "test_reward_specs:compute_score", "style": "verl", "ground_truth": "reward_model.ground_truth",
          "data_source": "dict", "name": "v"}]
    )  # fmt: skip
    log = RewardLog()
    inputs = reward_inputs(
        ["p", "p"], ["x=7", "x=8"], ["ignored", "ignored"],
        columns={"reward_model": [{"ground_truth": "7"}, {"ground_truth": "7"}]}, log=log,
    )  # fmt: skip
    assert score_completions(fns, [1.0], inputs).total.tolist() == [1.0, 0.0]
    assert log.extra == {"v/acc": [True, False]}
    with pytest.raises(KeyError, match="no column 'solution' for ground_truth; the records have .*'reward_model'"):
        VerlReward(compute_score, ground_truth="solution")(**inputs.kwargs())


# -------------------------------------------------------------------------------------------- reward model
@pytest.fixture(scope="module")
def reward_model_folder(tmp_path_factory):
    """A tiny random Qwen2 sequence classifier (num_labels=1) and corrpo's tiny tokenizer, saved to a folder."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from corrpo.models.loading import TinyArchitecture, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("reward_model")
    tokenizer = build_tiny_tokenizer(TinyArchitecture())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_reward_model_scores_finite_values_batched_as_one_by_one(reward_model_folder):
    prompts = ["2+2=", "17*3=", "1+1="]
    completions = ["4", "<think>17*3 is 51</think><answer>51</answer>", ""]
    batched = RewardModel(str(reward_model_folder), batch_size=3)(prompts, completions)
    single = RewardModel(str(reward_model_folder), batch_size=1)(prompts, completions)
    assert all(math.isfinite(v) for v in batched) and len(set(batched)) == 3
    assert batched == pytest.approx(single, abs=1e-5)


def test_a_reward_model_reads_conversations_through_its_chat_template(reward_model_folder):
    model = RewardModel(str(reward_model_folder))
    prompt = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>"}]  # a prefill
    (text,) = model.texts([prompt], [[{"role": "assistant", "content": "<think>4</think>"}]])
    rendered = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>4</think>"}], tokenize=False
    )
    assert text == rendered and text.count("<think>") == 1
    assert model.texts(["2+2="], ["4"]) == ["2+2=4"]


def test_a_reward_model_spec_loads_on_the_device_it_is_placed_on(reward_model_folder):
    fns = reward_functions([{"model": str(reward_model_folder), "batch_size": 2}])
    (name,) = fns
    assert name == reward_model_folder.name
    place_rewards(fns.values(), torch.device("meta"))  # moved with the policy: meta stands in for an accelerator
    assert fns[name].device.type == "meta"
    with pytest.raises(ValueError, match=r"rl.rewards\[0\].model: cannot load .*not a folder"):
        reward_functions([{"model": str(reward_model_folder / "missing")}])


def test_rewards_of_every_form_score_a_shrunk_fit_and_the_reward_model_runs_where_the_policy_runs(
    tmp_path, reward_model_folder, one_thread
):
    from conftest import run_tiny

    cli = run_tiny(
        tmp_path,
        f"--model.rl.rewards=[accuracy, {{function: 'test_reward_specs:make_near', kwargs: {{target: 6}}, name: near}},"
        f" {{function: 'test_reward_specs:compute_score', style: verl, name: v}},"
        f" {{model: '{reward_model_folder}', name: rm, batch_size: 3}}]",
        "--model.rl.reward_weights=[1.0, 0.1, 1.0, 0.1]",
        "--model.sft.steps=1",
        "--model.rl.steps=1",
        "--trainer.logger=false",
        "--trainer.callbacks.every_n_steps=100",
    )
    module = cli.model
    assert module.grpo.reward_fns["rm"].device == module.device
    rows = module.last_completions
    assert rows and all(math.isfinite(row["reward/rm"]) for row in rows)
    for row in rows:
        assert row["reward/near"] == -abs(6 - len(row["completion"]))
        assert row["reward/v"] == float(row["answer"] in row["completion"])


# ------------------------------------------------------------------------------------------------ dry run
RECORDS = [{"prompt": "2+2=", "answer": "4", "level": 1}, {"prompt": "3+3=", "answer": "6", "level": 2}]


def test_the_dry_run_passes_rewards_that_score_none_or_fail_on_some_placeholders():
    fns = {"accuracy": reward_functions(["accuracy"])["accuracy"], "none": unscorable, "some": raises_on_empty}
    assert "ok" in dry_run_rewards(fns, RECORDS)


@pytest.mark.parametrize(
    ("fn", "what"),
    [
        (always_raises, "raised on every one of the 6 samples .*verifier service unreachable"),
        (wrong_length, "returned 1 values for 6 samples"),
        (all_inf, r"returned \+-inf for every one of the 6"),
        (make_near, "missing 1 required positional argument: 'target'.*configured as \\{function: <path>, kwargs"),
    ],
)
def test_the_dry_run_stops_a_broken_reward_naming_it_and_what_failed(fn, what):
    with pytest.raises(RewardDryRunError, match=f"reward 'broken' .*failed its start-up dry run.*{what}"):
        dry_run_rewards({"format": reward_functions(["format"])["format"], "broken": fn}, RECORDS)


def test_the_dry_run_hands_columns_ids_and_conversational_completions_as_the_rl_step_does():
    seen = {}

    def spy(prompts, completions, completion_ids, level, answer, trainer_state, **kwargs):
        seen.update(completions=completions, ids=completion_ids, level=level, answer=answer, state=trainer_state)
        return [0.0] * len(completions)

    records = [{"prompt": [{"role": "user", "content": "2+2?"}], "answer": 4, "level": 1}]
    dry_run_rewards({"spy": spy}, records, encode=lambda text: [len(text)])
    assert seen["completions"][0] == [{"role": "assistant", "content": "<think>\n4\n</think>\n<answer>4</answer>"}]
    assert seen["completions"][-1] == [{"role": "assistant", "content": ""}]
    assert seen["level"] == [1, 1, 1] and seen["answer"] == ["4", "4", "4"] and seen["ids"][-1] == [0]


@pytest.mark.parametrize(
    ("reward", "named"),
    [
        ("test_reward_specs:make_near", "reward 'make_near'.*missing 1 required positional argument: 'target'"),
        ("test_reward_specs:always_raises", "reward 'always_raises'.*verifier service unreachable"),
        ("{function: 'test_reward_specs:compute_score', style: verl, ground_truth: solution, name: v}",
         "reward 'v'.*no column 'solution' for ground_truth"),
    ],
)  # fmt: skip
def test_a_broken_reward_stops_a_shrunk_fit_before_any_sft_step(reward, named, tmp_path, monkeypatch, one_thread):
    import sys

    import corrpo.module
    from corrpo.cli import main

    sft_steps = []
    real_sft_step = corrpo.module.sft_step
    monkeypatch.setattr(corrpo.module, "sft_step", lambda *a, **k: sft_steps.append(1) or real_sft_step(*a, **k))
    args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), *TINY_FAST_ARGS, "--trainer.logger=false"]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--model.rl.rewards=[accuracy, {reward}]"]
    monkeypatch.setattr(sys, "argv", ["corrpo", *args])
    with pytest.raises(SystemExit) as info:  # the console entry point: one message, no traceback
        main()
    message = str(info.value.code)
    assert re.match(f"corrpo: {named}", message) and "failed its start-up dry run" in message
    assert "Traceback" not in message  # SystemExit(<message>): Python prints the message alone
    assert sft_steps == []


@pytest.mark.parametrize("dry_run", [True, False])
def test_the_module_dry_runs_its_rewards_at_fit_start_unless_rl_reward_dry_run_is_false(dry_run):
    from types import SimpleNamespace

    from conftest import TINY_ARCH

    from corrpo.module import CorrPOModule

    rl = RLConfig(steps=1, rewards=["test_reward_specs:always_raises"], reward_dry_run=dry_run)
    module = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, rl=rl)
    module._data = SimpleNamespace(rl_records=lambda: RECORDS)
    if dry_run:
        with pytest.raises(RewardDryRunError, match="reward 'always_raises'"):
            module.on_fit_start()
    else:
        module.on_fit_start()  # nothing is called: the first RL step would find the fault


@pytest.mark.parametrize(
    ("reward", "named"),
    [
        ("no_such_module_xyz:reward", r"rl.rewards\[1\]: cannot import reward 'no_such_module_xyz:reward'"),
        ("{function: 'test_reward_specs:make_near', kwargs: {nope: 1}}",
         r"rl.rewards\[1\].kwargs: building the reward"),
    ],
)  # fmt: skip
def test_a_reward_that_cannot_be_built_is_one_message_naming_its_key(reward, named, tmp_path, monkeypatch):
    import sys

    from corrpo.cli import main

    args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--trainer.logger=false"]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--model.rl.rewards=[accuracy, {reward}]"]
    monkeypatch.setattr(sys, "argv", ["corrpo", *args])
    with pytest.raises(SystemExit) as info:
        main()
    assert re.match(f"corrpo: {named}", str(info.value.code)), info.value.code
