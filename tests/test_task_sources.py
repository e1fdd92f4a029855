"""Task sources: reasoning-gym prompts, HF source specs, field transforms, and the HF recipes' field mappings.

The Hugging Face datasets cannot be downloaded here, so each recipe in configs/ is run through
ReasoningDataModule with its own ``data`` section, the dataset names swapped for local jsonl/parquet files
of the same schema (GSM8K, MATH-lighteval, OpenR1-Math-220k, Mixture-of-Thoughts).
"""

import builtins
import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from corrpo.cli import build_cli
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.data.records import RecordError, load_records, parse_hf_source
from corrpo.data.transforms import TRANSFORMS, TransformError, parse_field
from corrpo.rewards.accuracy import accuracy_reward, parse_gold
from corrpo.rewards.answer import extract_answer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HF_CONFIGS = [
    "gsm8k.yaml",
    "math-lighteval.yaml",
    "openr1-math.yaml",
    "mixture-of-thoughts-sft.yaml",
    "qwen2.5-0.5b-instruct.yaml",
    "reasoning-gym.yaml",
]
RG_TASKS = ["gsm_symbolic", "basic_arithmetic", "chain_sum"]


# ----------------------------------------------------------------------------- rows of the real schemas
def gsm8k_row(i: int) -> dict:
    return {
        "question": f"Natalia sold clips to {i + 48} of her friends in April, and half as many in May. How many?",
        "answer": f"Natalia sold 48/2 = <<48/2=24>>24 clips.\nShe sold 48+24 = <<48+24=72>>72.\n#### {1000 + i:,}",
    }


def math_row(i: int) -> dict:
    return {
        "problem": f"Simplify $\\frac{{2}}{{{2 * i + 4}}}$.",
        "level": "Level 2",
        "type": "Algebra",
        "solution": f"Divide by two: $\\frac{{2}}{{{2 * i + 4}}} = \\boxed{{\\frac{{1}}{{{i + 2}}}}}$.",
    }


def openr1_row(i: int) -> dict:
    problem = f"Find $x$ if $x - {i} = 0$."
    trace = f"<think>\nAdd {i} to both sides.\n</think>\nSo $x = \\boxed{{{i}}}$."
    return {
        "problem": problem,
        "solution": f"Adding {i} to both sides, $x = \\boxed{{{i}}}$.",
        "answer": str(i),
        "problem_type": "Algebra",
        "question_type": "math-word-problem",
        "source": "olympiads",
        "uuid": f"uuid-{i}",
        "is_reasoning_complete": [True, True],
        "generations": [trace, trace],
        "correctness_math_verify": [True, True],
        "correctness_llama": None,
        "finish_reasons": None,
        "correctness_count": 2,
        "messages": [{"content": problem, "role": "user"}, {"content": trace, "role": "assistant"}],
    }


def mot_row(i: int) -> dict:
    return {
        "messages": [
            {"content": f"What is {i} + {i}? Put the answer in \\boxed{{}}.", "role": "user"},
            {"content": f"<think>\n{i} + {i} = {2 * i}\n</think>\n\nSo $\\boxed{{{2 * i}}}$.", "role": "assistant"},
        ],
        "num_tokens": 40 + i,
        "source": "open-r1/OpenR1-Math-220k",
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_parquet(path)
    return path


def local_sources(config: str, tmp_path: Path) -> dict[str, str]:
    """The config's HF dataset names replaced by local files of the same schema (as written by the hub)."""
    gsm8k = str(write_jsonl(tmp_path / "gsm8k-train.jsonl", [gsm8k_row(i) for i in range(40)]))
    gsm8k_test = str(write_jsonl(tmp_path / "gsm8k-test.jsonl", [gsm8k_row(i) for i in range(100, 110)]))
    math = str(write_jsonl(tmp_path / "math.jsonl", [math_row(i) for i in range(40)]))
    openr1 = str(write_parquet(tmp_path / "openr1.parquet", [openr1_row(i) for i in range(40)]))
    mot = str(write_parquet(tmp_path / "mot.parquet", [mot_row(i) for i in range(40)]))
    files = {
        "openai/gsm8k:main": gsm8k,
        "openai/gsm8k:main[test]": gsm8k_test,
        "DigitalLearningGmbH/MATH-lighteval": math,
        "open-r1/OpenR1-Math-220k": openr1,
        "open-r1/Mixture-of-Thoughts:math": mot,
    }
    data = yaml.safe_load((CONFIGS / config).read_text())["data"]
    return {key: files[value] for key, value in data.items() if key.endswith("_source") and value in files}


def config_datamodule(config: str, tmp_path: Path) -> ReasoningDataModule:
    data = yaml.safe_load((CONFIGS / config).read_text())["data"]
    data.update(local_sources(config, tmp_path), n_probe=4, n_test=5, n_train=30, sft_steps=2, rl_steps=2)
    return ReasoningDataModule(**data)


# ----------------------------------------------------------------------------------------- the recipes
@pytest.mark.parametrize("config", HF_CONFIGS)
def test_recipe_parses_with_print_config_keeping_sources_and_fields(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    written = yaml.safe_load((CONFIGS / config).read_text())["data"]
    for key, value in written.items():
        assert printed[key] == value, key


@pytest.mark.parametrize("config", HF_CONFIGS)
def test_recipe_field_mapping_reads_its_schema(config, tmp_path):
    if "reasoning_gym:" in (CONFIGS / config).read_text():
        pytest.importorskip("reasoning_gym")
    dm = config_datamodule(config, tmp_path)
    pools = dm.pools()
    assert dm.n_skipped == 0
    assert len(pools["probe"]) == 4 and len(pools["test"]) == 5 and pools["sft"] and pools["rl"]
    for record in pools["rl"] + pools["test"]:
        gold = record["answer"]
        assert parse_gold(gold) is not None, gold
        assert accuracy_reward([record["prompt"]], [f"So $\\boxed{{{gold}}}$."], [gold]) == [1.0]
        assert accuracy_reward([record["prompt"]], ["So $\\boxed{12345678}$."], [gold]) == [0.0]
    for record in pools["sft"] + pools["probe"]:
        found = extract_answer(record["completion"])
        assert found, record  # every SFT trace ends in an answer the accuracy reward can read
        if "answer" in record:
            assert accuracy_reward([record["prompt"]], [record["completion"]], [record["answer"]]) == [1.0]
    held = {r["prompt"] for r in pools["probe"] + pools["test"]}
    assert not held & {r["prompt"] for r in pools["sft"] + pools["rl"]}
    batches = list(dm.step_batches())
    assert [b["phase"] for b in batches] == ["sft", "sft", "rl", "rl"]


def test_gsm8k_transforms_and_test_split(tmp_path):
    dm = config_datamodule("gsm8k.yaml", tmp_path)
    pools = dm.pools()
    record = next(r for r in pools["sft"] + pools["probe"] if r["prompt"] == gsm8k_row(3)["question"])
    assert record["answer"] == "1003"
    assert "<<" not in record["completion"] and "####" not in record["completion"]
    assert record["completion"].endswith("She sold 48+24 = 72.\nThe answer is $\\boxed{1003}$.")
    assert {r["answer"] for r in pools["test"]} == {str(1100 + i) for i in range(5)}  # the test file, first rows


def test_mixture_of_thoughts_messages(tmp_path):
    pools = config_datamodule("mixture-of-thoughts-sft.yaml", tmp_path).pools()
    record = next(r for r in pools["sft"] + pools["probe"] if r["prompt"].startswith("What is 7 + 7?"))
    assert record["completion"].startswith("<think>\n7 + 7 = 14\n</think>") and "answer" not in record
    assert extract_answer(record["completion"]) == "14"


# ------------------------------------------------------------------------------------ malformed rows
@pytest.mark.parametrize(
    ("bad_row", "fields", "named"),
    [
        ({"question": "q?", "answer": "It is 5."}, {"prompt": "question", "answer": "answer|gsm8k_answer"}, "####"),
        ({"problem": "p?", "solution": "It is 5."}, {"prompt": "problem", "answer": "solution|boxed"}, "boxed"),
        ({"messages": [{"role": "assistant", "content": "a"}], "answer": "1"}, {"prompt": "messages|user"}, "'user'"),
        ({"messages": "hi", "answer": "1"}, {"prompt": "messages|user"}, "list of {role, content}"),
        ({"question": "q?"}, {"prompt": "question", "answer": "answer|gsm8k_answer"}, "missing"),
    ],
)
def test_malformed_row_names_file_line_field_and_column(tmp_path, bad_row, fields, named):
    good = {"question": "q", "problem": "p", "answer": "#### 1", "solution": "\\boxed{1}"}
    good["messages"] = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad_row, good])
    with pytest.raises(RecordError) as info:
        load_records(str(path), "rl", fields=fields)
    message = str(info.value)
    canonical = "prompt" if fields["prompt"].startswith("messages") else "answer"
    assert f"{path}:3:" in message and f"'{canonical}'" in message and fields[canonical] in message
    assert named in message
    skipped = load_records(str(path), "rl", fields=fields, on_error="skip")
    assert len(skipped.records) == 3 and skipped.n_skipped == 1


def test_malformed_parquet_row_and_datamodule_error(tmp_path):
    rows = [mot_row(i) for i in range(6)]
    rows[4] = {**rows[4], "messages": [{"role": "user", "content": "only a question"}]}
    path = write_parquet(tmp_path / "mot.parquet", rows)
    dm = ReasoningDataModule(
        sft_source=str(path), sft_fields={"prompt": "messages|user", "completion": "messages|assistant"}, n_probe=2
    )
    with pytest.raises(RecordError, match=r"mot\.parquet: row 5: field 'completion' \(column 'messages\|assistant'\)"):
        dm.pools()


def test_transform_unit_cases():
    assert TRANSFORMS["gsm8k_answer"]("a\n#### 1,234,567") == "1234567"
    assert TRANSFORMS["gsm8k_answer"]("#### -3.5 ") == "-3.5"
    assert TRANSFORMS["boxed"]("x \\boxed{1} then \\boxed{\\frac{a}{b}} \\boxed{") == "\\frac{a}{b}"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "user", "content": "u2"}]
    chat += [{"role": "assistant", "content": "a1"}, {"role": "assistant", "content": "a2"}]
    assert TRANSFORMS["user"](chat) == "u1" and TRANSFORMS["assistant"](chat) == "a2"
    with pytest.raises(TransformError, match="empty 'assistant'"):
        TRANSFORMS["assistant"]([{"role": "assistant", "content": " "}])
    assert parse_field("answer") == ("answer", None)
    assert parse_field(" solution | boxed ") == ("solution", TRANSFORMS["boxed"])
    with pytest.raises(ValueError, match="unknown transform 'boxd'"):
        parse_field("solution|boxd")
    with pytest.raises(ValueError, match="no column"):
        parse_field("|boxed")


def test_unknown_transform_fails_before_reading(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["{not json"])
    with pytest.raises(ValueError, match="unknown transform 'hashes'"):
        load_records(str(path), "rl", fields={"answer": "answer|hashes"})


# ------------------------------------------------------------------------------------- HF source specs
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("openai/gsm8k", ("openai/gsm8k", None, "train")),
        ("openai/gsm8k:main", ("openai/gsm8k", "main", "train")),
        ("openai/gsm8k:main[test]", ("openai/gsm8k", "main", "test")),
        ("DigitalLearningGmbH/MATH-lighteval[test[:500]]", ("DigitalLearningGmbH/MATH-lighteval", None, "test[:500]")),
    ],
)
def test_hf_source_spec(source, expected):
    assert parse_hf_source(source) == expected


@pytest.mark.parametrize("source", ["a:b:c", "name with space", "x[", ":main"])
def test_bad_hf_source_spec_is_named(source):
    with pytest.raises(ValueError, match="name\\[:config\\]"):
        load_records(source, "rl")


def test_hf_config_and_split_reach_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split="train"):
        calls.append((name, config, split))
        return [{"question": "q1", "answer": "s\n#### 7"}, {"question": "q2", "answer": "no hashes"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    fields = {"prompt": "question", "answer": "answer|gsm8k_answer"}
    with pytest.raises(RecordError, match=r"openai/gsm8k:main\[test\]: row 2: field 'answer'"):
        load_records("openai/gsm8k:main[test]", "rl", fields=fields)
    assert calls == [("openai/gsm8k", "main", "test")]
    result = load_records("open-r1/Mixture-of-Thoughts:math", "rl", fields=fields, on_error="skip")
    assert calls[-1] == ("open-r1/Mixture-of-Thoughts", "math", "train")
    assert result.records == [{"prompt": "q1", "answer": "7"}] and result.n_skipped == 1


# ---------------------------------------------------------------------------------------- reasoning-gym
def test_reasoning_gym_prefix_is_not_an_hf_name():
    with pytest.raises(ValueError, match="ReasoningDataModule serves it"):
        load_records("reasoning_gym:chain_sum", "rl")


def test_reasoning_gym_missing_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "reasoning_gym" or name.startswith("reasoning_gym."):
            raise ImportError("No module named 'reasoning_gym'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r'pip install "corrpo\[reasoning-gym\]"'):
        ReasoningDataModule(rl_source="reasoning_gym:chain_sum", n_probe=2, n_test=3, n_train=10).pools()


def test_reasoning_gym_as_sft_source_is_refused_by_key():
    with pytest.raises(ValueError, match="data.sft_source: 'reasoning_gym:chain_sum' has prompts and answers"):
        ReasoningDataModule(sft_source="reasoning_gym:chain_sum").pools()
    with pytest.raises(ValueError, match="name the reasoning-gym task"):
        ReasoningDataModule(rl_source="reasoning_gym:").pools()


@pytest.mark.parametrize("task", RG_TASKS)
def test_reasoning_gym_records_disjoint_deterministic_and_scorable(task):
    pytest.importorskip("reasoning_gym")
    from corrpo.data.reasoning_gym_source import reasoning_gym_records

    train = reasoning_gym_records(task, 150, seed=0, split="train")
    test = reasoning_gym_records(task, 60, seed=0, split="test")
    assert len(train) == 150 and len(test) == 60
    assert reasoning_gym_records(task, 150, seed=0, split="train") == train
    assert reasoning_gym_records(task, 40, seed=0, split="train") == train[:40]
    assert reasoning_gym_records(task, 150, seed=1, split="train") != train
    other_seed_test = reasoning_gym_records(task, 60, seed=1, split="test")
    train_prompts = {r["prompt"] for r in train}
    assert not train_prompts & {r["prompt"] for r in test + other_seed_test}
    for record in train + test:
        assert set(record) == {"prompt", "answer"} and isinstance(record["answer"], str)
        assert int(record["answer"]) == float(record["answer"])  # integer golds for these tasks
    golds = [r["answer"] for r in train + test]
    assert accuracy_reward([], [f"<answer>{g}</answer>" for g in golds], golds) == [1.0] * len(golds)
    assert accuracy_reward([], [f"\\boxed{{{int(g) + 1}}}" for g in golds], golds) == [0.0] * len(golds)


def test_reasoning_gym_errors():
    pytest.importorskip("reasoning_gym")
    from corrpo.data.reasoning_gym_source import reasoning_gym_records

    with pytest.raises(ValueError, match="reasoning_gym:no_such_task"):
        reasoning_gym_records("no_such_task", 5)
    with pytest.raises(ValueError, match="split"):
        reasoning_gym_records("chain_sum", 5, split="probe")


def test_reasoning_gym_in_the_datamodule():
    pytest.importorskip("reasoning_gym")
    dm = ReasoningDataModule(
        rl_source="reasoning_gym:gsm_symbolic",
        n_train=40,
        n_test=12,
        n_probe=4,
        sft_steps=1,
        rl_steps=2,
        rl_batch_size=4,
        seed=3,
    )
    pools = dm.pools()
    assert len(pools["rl"]) == 40 and len(pools["test"]) == 12
    assert not {r["prompt"] for r in pools["rl"]} & {r["prompt"] for r in pools["test"]}
    assert pools["sft"][0]["completion"].startswith("<think>")  # SFT stays on the embedded task
    rl_batch = dm.step_batches()[1]
    assert rl_batch["phase"] == "rl" and len(rl_batch["answer"]) == 4
    assert all(parse_gold(a) is not None for a in rl_batch["answer"])
    explicit = ReasoningDataModule(test_source="reasoning_gym:basic_arithmetic", n_test=7, n_train=50).pools()
    assert len(explicit["test"]) == 7 and explicit["test"][0]["prompt"].startswith("Calculate")
