"""docs/tutorials/chat-model.md cannot go stale: its files exist, its data loads as TRL's conversational format, its
own rewards and reward model score, and its config builds through the real CLI parser with rewards that pass the
start-up dry run (no fit: tests/test_conversational.py and tests/test_reward_specs.py fit with these reward forms)."""

import math
import re

import pytest
import yaml
from conftest import REPO

from corrpo.data.records import load_records
from corrpo.rewards import parse_reward_spec, reward_functions
from corrpo.rewards.dry_run import dry_run_rewards
from corrpo.rewards.reward_model import RewardModel

TUTORIAL = REPO / "docs" / "tutorials" / "chat-model.md"
FOLDER = REPO / "docs" / "tutorials" / "chat-model"
CONFIG = FOLDER / "chat.yaml"
REWARD_NAMES = ["accuracy_reward", "think_format_reward", "format_reward", "overlong", "max_words", "verl", "rm"]


@pytest.fixture
def tutorial_path(monkeypatch):
    """The tutorial's ``PYTHONPATH=docs/tutorials/chat-model:tests`` (tests/ is on the path already)."""
    monkeypatch.syspath_prepend(str(FOLDER))


def test_every_tutorial_file_the_tutorial_names_exists_and_it_is_in_the_index():
    named = set(re.findall(r"docs/tutorials/chat-model/[\w.-]+", TUTORIAL.read_text()))
    assert {f"docs/tutorials/chat-model/{name}" for name in ("chat.yaml", "rl.jsonl", "sft.jsonl")} <= named
    assert [path for path in sorted(named) if not (REPO / path).exists()] == []
    assert "(chat-model.md)" in (REPO / "docs" / "tutorials" / "README.md").read_text()


def test_the_tutorials_yaml_and_python_blocks_are_copied_from_its_files():
    blocks = re.findall(r"```(yaml|python)\n(.*?)```", TUTORIAL.read_text(), re.DOTALL)
    files = {"yaml": CONFIG.read_text(), "python": (FOLDER / "chat_rewards.py").read_text()}
    assert {lang for lang, _ in blocks} == {"yaml", "python"}
    assert [body[:60] for lang, body in blocks if body not in files[lang]] == []


def test_the_tutorial_data_loads_as_trl_conversational_records_with_the_gold_from_solution():
    sft = load_records(str(FOLDER / "sft.jsonl"), "sft").records
    rl = load_records(str(FOLDER / "rl.jsonl"), "rl", keep_columns=True).records
    assert len(sft) == 16 and len(rl) == 16
    assert all(r["prompt"][0]["role"] == "user" and r["completion"][0]["role"] == "assistant" for r in sft)
    assert all(r["solution"] == f"\\boxed{{{r['answer']}}}" and r["data_source"] == "arithmetic" for r in rl)
    assert not {r["prompt"][0]["content"] for r in sft} & {r["prompt"][0]["content"] for r in rl}


def test_the_tutorial_config_names_rewards_of_every_form_with_one_weight_each():
    rl = yaml.safe_load(CONFIG.read_text())["model"]["rl"]
    specs = [parse_reward_spec(entry, f"rl.rewards[{i}]") for i, entry in enumerate(rl["rewards"])]
    assert len(rl["reward_weights"]) == len(specs) == len(REWARD_NAMES)
    assert [s.kwargs is not None for s in specs].count(True) == 2 and specs[5].style == "verl"
    assert specs[6].model == "runs/chat-model/reward-model"


def test_the_tutorial_rewards_and_reward_model_score_conversational_completions(tutorial_path, tmp_path):
    from make_reward_model import build_reward_model

    fns = reward_functions(
        [{"function": "chat_rewards:get_max_words_reward", "kwargs": {"max_words": 3}, "name": "max_words"},
         {"function": "chat_rewards:compute_score", "style": "verl", "name": "verl"}]
    )  # fmt: skip
    prompts = [[{"role": "user", "content": "2 +3 ="}]] * 2
    completions = [[{"role": "assistant", "content": "so \\boxed{5}"}], [{"role": "assistant", "content": "a b c d"}]]
    assert fns["max_words"](prompts=prompts, completions=completions) == [0.0, -1.0]
    assert fns["verl"](prompts, completions, answer=["5", "5"]) == [1.0, 0.0]
    model = RewardModel(str(build_reward_model(tmp_path / "rm")), batch_size=1)
    assert all(math.isfinite(score) for score in model(prompts, completions))


def test_the_tutorial_config_builds_through_the_cli_and_its_rewards_pass_the_dry_run(
    tutorial_path, tmp_path, monkeypatch
):
    pytest.importorskip("trl")
    from make_reward_model import build_reward_model

    from corrpo.cli import build_cli

    monkeypatch.chdir(tmp_path)  # the tutorial's relative paths, run from a copy of the repository root
    (tmp_path / "docs").symlink_to(REPO / "docs")
    build_reward_model("runs/chat-model/reward-model")
    args = ["--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(CONFIG), "--trainer.logger=false"]
    cli = build_cli([*args, f"--trainer.default_root_dir={tmp_path / 'runs' / 'tut-chat'}"], run=False)
    assert list(cli.model.grpo.reward_fns) == REWARD_NAMES
    assert cli.model.prompt_format.system_prompt == "Reason in <think>, then answer in <answer>."
    assert cli.model.sft.steps + cli.model.rl.steps <= 10  # the seconds-long run the tutorial promises
    summary = dry_run_rewards(cli.model.grpo.reward_fns, cli.datamodule.rl_records())
    assert summary.endswith(": ok")
