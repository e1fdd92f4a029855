"""Conversational data end to end, as TRL does it: message-list records, chat-template rendering (system prompt,
template kwargs), SFT targets, batches, completions rows, ``save_to_disk`` folders, early field errors, and shrunk fits
whose rewards (TRL's own, and open-r1-style copies) read ``completion[0]["content"]`` unmodified."""

import functools
import json
import math
import sys

import openr1_rewards
import pytest
import torch
from conftest import REPO, TINY_ARCH, TINY_FAST_ARGS, run_tiny
from reward_inputs import reward_inputs

from corrpo.cli import main
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.data.records import RecordError, load_records
from corrpo.models.batching import PromptFormat, encode_prompts, encode_sft_batch, format_completion, format_prompt
from corrpo.models.loading import (
    TinyArchitecture,
    build_char_tokenizer,
    build_tiny_policy,
    build_tiny_tokenizer,
    export_policy,
)
from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.combine import completion_rows, score_completions
from corrpo.rewards.format import format_reward

SYSTEM = {"role": "system", "content": "Answer in tags."}
TOKENIZER = build_tiny_tokenizer(TinyArchitecture())


def chat_record(a: int, b: int) -> dict:
    """One row of TRL's conversational prompt-completion format, with TRL's ``solution`` column for the gold."""
    trace = f"<think>\n{a}+{b}={a + b}\n</think>\n<answer>\n{a + b}\n</answer>"
    return {
        "prompt": [SYSTEM, {"role": "user", "content": f"{a}+{b}="}],
        "completion": [{"role": "assistant", "content": trace}],
        "solution": f"${a + b}$",
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [chat_record(a, b) for a in range(1, 7) for b in range(1, 7)])


# ------------------------------------------------------------------------------------------------ records
@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_conversational_records_keep_message_lists_and_rl_takes_its_answer_from_solution(tmp_path, suffix):
    rows = [chat_record(2, 3), {**chat_record(4, 4), "solution": "so it is $\\boxed{8}$"}]
    path = tmp_path / f"chat.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, rows)
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)  # message lists come back as numpy arrays of dicts
    sft = load_records(str(path), "sft").records
    assert sft[0]["prompt"] == rows[0]["prompt"] and type(sft[0]["prompt"]) is list
    assert sft[0]["completion"] == rows[0]["completion"] and type(sft[0]["completion"][0]) is dict
    rl = load_records(str(path), "rl", keep_columns=True).records
    assert [r["answer"] for r in rl] == ["$5$", "8"]  # the boxed content, else the whole solution
    assert rl[1]["solution"] == "so it is $\\boxed{8}$"  # kept for TRL's accuracy_reward(completions, solution)


def test_a_malformed_message_list_is_named_with_its_message(tmp_path):
    bad = {"prompt": [{"role": "user"}], "answer": "1"}
    path = write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(RecordError, match=r"bad\.jsonl:1: field prompt message 0 must be a \{role, content\}"):
        load_records(str(path), "rl")
    text_prompt = {"prompt": "1+1=", "completion": [{"role": "assistant", "content": "2"}]}
    write_jsonl(path, [text_prompt])
    with pytest.raises(RecordError, match=r"bad\.jsonl:1: field 'completion' is a message list but 'prompt' is text"):
        load_records(str(path), "sft")


def test_a_missing_field_names_the_file_the_field_and_the_columns_present(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"question": "1+1=", "final": "2"}])
    with pytest.raises(RecordError, match=r"rl\.jsonl:1: field prompt missing \(columns: question, final\)"):
        load_records(str(path), "rl")


def test_a_save_to_disk_folder_is_read_by_absolute_or_relative_path_and_by_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [chat_record(1, a) for a in range(1, 4)]
    single = tmp_path / "single"
    datasets.Dataset.from_list(rows).save_to_disk(str(single))
    several = tmp_path / "several"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(several))

    def hub(*args, **kwargs):
        raise AssertionError("a save_to_disk folder must never go to load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert [r["prompt"] for r in load_records(str(single), "sft").records] == [r["prompt"] for r in rows]
    monkeypatch.chdir(tmp_path)
    assert len(load_records("single", "rl").records) == 3  # relative, no ./
    assert len(load_records("several", "sft").records) == 3  # a DatasetDict: "train" unless the source names one
    assert len(load_records("several[test]", "sft").records) == 1
    with pytest.raises(ValueError, match=r"several'?: a DatasetDict folder without a split 'dev'.*\['test', 'train'\]"):
        load_records("several[dev]", "sft")
    with pytest.raises(RecordError, match=r"several\[train\]: row 1: field 'answer' \(column 'final'\) missing "
                       r"\(columns: prompt, completion, solution\)"):  # fmt: skip
        load_records(str(several), "rl", fields={"answer": "final"})  # mapped elsewhere: no solution fallback


# ---------------------------------------------------------------------------------------------- rendering
def test_a_message_list_prompt_is_always_rendered_with_the_chat_template_and_generation_prompt():
    user = [{"role": "user", "content": "1+1="}]
    assert format_prompt(TOKENIZER, user) == "user: 1+1=<eos>\nassistant: "
    assert format_prompt(TOKENIZER, "1+1=") == "1+1="  # text prompts keep model.use_chat_template's switch
    assert format_prompt(TOKENIZER, "1+1=", True) == "user: 1+1=<eos>\nassistant: "
    prefilled = user + [{"role": "assistant", "content": "<think>"}]  # continued, as TRL does
    assert format_prompt(TOKENIZER, prefilled) == "user: 1+1=<eos>\nassistant: <think>"
    with pytest.raises(ValueError, match="chat template"):
        format_prompt(build_char_tokenizer(), user)


def test_the_system_prompt_goes_first_unless_the_prompt_has_one_and_template_kwargs_reach_the_template():
    fmt = PromptFormat(system_prompt="Be brief.", chat_template_kwargs={"enable_thinking": False})
    user = [{"role": "user", "content": "1+1="}]
    assert format_prompt(TOKENIZER, user, fmt) == "system: Be brief.<eos>\nuser: 1+1=<eos>\nassistant: <think></think>"
    assert format_prompt(TOKENIZER, [SYSTEM, *user], fmt).startswith("system: Answer in tags.<eos>\nuser:")
    text = PromptFormat(use_chat_template=True, system_prompt="Be brief.")
    assert format_prompt(TOKENIZER, "1+1=", text) == "system: Be brief.<eos>\nuser: 1+1=<eos>\nassistant: "
    with pytest.raises(ValueError, match="model.system_prompt is set but the prompts are text"):
        format_prompt(TOKENIZER, "1+1=", PromptFormat(system_prompt="Be brief."))
    with pytest.raises(ValueError, match=r"model.chat_template_kwargs: \['add_generation_prompt'\]"):
        PromptFormat(chat_template_kwargs={"add_generation_prompt": False})
    enc = encode_prompts(TOKENIZER, [user, [{"role": "user", "content": "22+22="}]], use_chat_template=fmt)
    ids = enc["input_ids"][0][enc["attention_mask"][0].bool()]
    assert TOKENIZER.decode(ids) == format_prompt(TOKENIZER, user, fmt)


def test_sft_on_a_conversational_record_trains_on_the_assistant_turn_then_eos():
    record = chat_record(2, 3)
    content = record["completion"][0]["content"]
    assert format_completion(TOKENIZER, record["prompt"], record["completion"]) == content
    enc = encode_sft_batch(TOKENIZER, [record["prompt"]], [record["completion"]], 512)
    ids, targets = enc["input_ids"][0], enc["loss_mask"][0]
    assert TOKENIZER.decode(ids[targets]) == content + "<eos>"
    assert TOKENIZER.decode(ids[~targets & enc["attention_mask"][0].bool()]) == format_prompt(
        TOKENIZER, record["prompt"]
    )


# ------------------------------------------------------------------------------------------ data and rows
def test_batches_carry_message_lists_and_held_out_chats_never_meet_training(chat_file):
    dm = ReasoningDataModule(
        sft_source=str(chat_file), rl_source=str(chat_file), sft_steps=2, rl_steps=2, sft_batch_size=3,
        rl_batch_size=2, n_probe=4, n_test=4, eval_batch_size=3,
    )  # fmt: skip
    steps = dm.step_batches()
    sft, rl = steps[0], steps[2]
    assert all(isinstance(p, list) and p[0] == SYSTEM for p in sft["prompt"] + rl["prompt"])
    assert all(c[0]["role"] == "assistant" for c in sft["completion"])
    assert rl["columns"]["solution"] == rl["answer"]  # no boxed answer: the whole solution
    val = next(iter(dm.val_dataloader()))
    assert val["prompt"] == [r["prompt"] for r in dm.test_records()[:3]]  # lists of dicts, not collated tensors
    held = {json.dumps(r["prompt"]) for r in dm.probe_records() + dm.test_records()}
    pools = dm.pools()
    assert not held & {json.dumps(r["prompt"]) for r in pools["sft"] + pools["rl"]}


def test_corrpo_rewards_and_the_completions_rows_read_both_completion_forms():
    prompts = [chat_record(2, 3)["prompt"], "2+3="]
    completions = [[{"role": "assistant", "content": "<think>x</think><answer>5</answer>"}], "<answer>4</answer>"]
    assert accuracy_reward(prompts, completions, answer=["5", "5"]) == [1.0, 0.0]
    assert format_reward(prompts, completions) == [1.0, 0.0]
    inputs = reward_inputs(prompts, completions, answers=["5", "5"])
    scores = score_completions({"accuracy": accuracy_reward}, [1.0], inputs)
    rows = completion_rows(0, inputs, scores, scores.total, torch.zeros(2))
    assert rows[0]["prompt"] == "system: Answer in tags.\nuser: 2+3=" and rows[1]["prompt"] == "2+3="
    assert rows[0]["completion"] == "<think>x</think><answer>5</answer>" and rows[0]["reward/accuracy"] == 1.0


# ------------------------------------------------------------------------------------------- shrunk fits
def spy_on(monkeypatch, module, names: list[str]) -> dict[str, list]:
    """Replace ``module.<name>`` by a wrapper (same signature) that records the ``completions`` it is called with."""
    seen: dict[str, list] = {name: [] for name in names}
    for name in names:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            seen[_name].extend(kwargs["completions"])
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return seen


def chat_fit(root, chat_file, rewards: list[str], *extra: str):
    return run_tiny(
        root, "--trainer.logger=false", f"--data.sft_source={chat_file}", f"--data.rl_source={chat_file}",
        "--model.sft.steps=2", "--model.rl.steps=2", "--data.n_probe=4", "--data.n_test=4",
        f"--model.rl.rewards=[{', '.join(rewards)}]", "--model.rl.reward_weights=null", *extra,
    )  # fmt: skip


def assert_scored_message_lists(cli, seen: dict[str, list]) -> None:
    metrics = cli.trainer.callback_metrics
    for name, completions in seen.items():
        assert len(completions) >= 2 * 2 * 4, name  # 2 RL steps of 2 prompts x 4 generations (and any dry run)
        assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions), name
        assert math.isfinite(float(metrics[f"rl/rewards/{name}/mean"])), name
        assert float(metrics[f"rl/rewards/{name}/failed"]) == 0, name


def test_trl_rewards_score_conversational_rollouts_unmodified(tmp_path, chat_file, monkeypatch, one_thread):
    pytest.importorskip("trl")
    import trl.rewards

    seen = spy_on(monkeypatch, trl.rewards, ["accuracy_reward", "think_format_reward"])
    cli = chat_fit(
        tmp_path, chat_file, ["trl.rewards:accuracy_reward", "trl.rewards:think_format_reward"],
        "--model.system_prompt=Think first.", '--model.chat_template_kwargs={"enable_thinking": false}',
    )  # fmt: skip
    assert_scored_message_lists(cli, seen)
    assert cli.model.prompt_format.chat_template_kwargs == {"enable_thinking": False}
    row = cli.model.last_completions[0]
    assert row["prompt"].startswith("system: Answer in tags.\nuser: ") and isinstance(row["completion"], str)


def test_open_r1_rewards_score_conversational_rollouts_unmodified(tmp_path, chat_file, monkeypatch, one_thread):
    names = ["accuracy_reward", "format_reward", "tag_count_reward", "reasoning_steps_reward", "len_reward"]
    seen = spy_on(monkeypatch, openr1_rewards, names)
    cli = chat_fit(tmp_path, chat_file, [f"openr1_rewards:{name}" for name in names])
    assert_scored_message_lists(cli, seen)


def test_a_wrong_field_stops_the_cli_before_any_run_folder_without_a_traceback(tmp_path, monkeypatch, capsys):
    bad = write_jsonl(tmp_path / "rl.jsonl", [{"question": f"{a}+1=", "final": str(a + 1)} for a in range(30)])
    root = tmp_path / "runs"
    args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), f"--data.rl_source={bad}",
            f"--trainer.default_root_dir={root}", *TINY_FAST_ARGS[:3]]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["corrpo", *args])
    with pytest.raises(SystemExit) as info:
        main()
    message = str(info.value.code)
    assert message.startswith("corrpo: ") and "Traceback" not in message
    assert f"{bad}:1: field prompt missing (columns: question, final)" in message
    assert not any(root.iterdir()), "a run folder was left behind"


def test_a_broken_chat_template_stops_the_cli_at_start_up_naming_the_record_and_the_keys(tmp_path, monkeypatch):
    """Before: found at the first evaluation after SFT, with the run folder written. Now: before any step."""
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m.content }}"  # no endfor: a Jinja syntax error
    policy = export_policy(build_tiny_policy("qwen2", tokenizer, TINY_ARCH), tokenizer, tmp_path / "policy")
    root = tmp_path / "runs"
    args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), f"--model.policy={policy}",
            "--model.use_chat_template=true", f"--trainer.default_root_dir={root}", *TINY_FAST_ARGS[:3]]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["corrpo", *args])
    with pytest.raises(SystemExit) as info:
        main()
    message = str(info.value.code)
    assert message.startswith("corrpo: record 1 of the sft data cannot be rendered (TemplateSyntaxError: ")
    assert "model.use_chat_template" in message and "Traceback" not in message
    assert not any(root.iterdir()), "a run folder was left behind"
