"""The embedded arithmetic task (determinism, correctness, disjoint splits) and loading user records."""

import builtins
import json
import re

import pandas as pd
import pytest

from corrpo.data.arithmetic import ArithmeticTask, split_of
from corrpo.data.records import LoadResult, RecordError, load_records
from corrpo.rewards.answer import extract_answer
from corrpo.rewards.format import format_reward

STEP = re.compile(r"^(\d+)([-+*])(\d+)=(\d+)$")


def check_record(record: dict, task: ArithmeticTask) -> None:
    """Re-evaluate the prompt left to right and every trace step independently of the generator."""
    tokens = record["prompt"].split(" ")
    assert tokens[-1] == "="
    value, ops = int(tokens[0]), tokens[1:-1]
    assert task.min_ops <= len(ops) <= task.max_ops
    think = re.fullmatch(r"<think>(.*)</think><answer>(\d+)</answer>", record["completion"])
    assert think, record
    steps = think.group(1).split(" ")
    assert len(steps) == len(ops)
    for op_token, step in zip(ops, steps, strict=True):
        op, operand = op_token[0], int(op_token[1:])
        a, step_op, b, c = STEP.fullmatch(step).groups()
        assert (int(a), step_op, int(b)) == (value, op, operand)
        value = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        assert int(c) == value
        assert 0 <= value <= task.max_value
        assert 1 <= operand <= task.max_operand
    assert record["answer"] == str(value) == think.group(2) == extract_answer(record["completion"])


def test_arithmetic_deterministic_and_prefix_stable():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert a.records("train", 50) == b.records("train", 50)
    assert a.records("train", 80)[:50] == a.records("train", 50)
    assert ArithmeticTask(seed=4).records("train", 50) != a.records("train", 50)


def test_arithmetic_records_correct_and_formatted():
    task = ArithmeticTask(seed=1)
    records = task.records("train", 300) + task.records("test", 100)
    for record in records:
        check_record(record, task)
    assert format_reward([], [r["completion"] for r in records]) == [1.0] * len(records)
    alphabet = set(task.alphabet())
    assert all(set(r["prompt"] + r["completion"]) <= alphabet for r in records)
    assert len(task.alphabet()) == len(alphabet)


def test_arithmetic_splits_disjoint():
    task = ArithmeticTask(seed=0)
    prompts = {split: [r["prompt"] for r in task.records(split, 500)] for split in ("train", "probe", "test")}
    for split, items in prompts.items():
        assert len(set(items)) == 500
        assert all(split_of(p) == split for p in items)
    assert not set(prompts["train"]) & set(prompts["probe"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["probe"]) & set(prompts["test"])
    # Splits are fixed by the prompt, not the seed: another seed's test problems never leak into train.
    other = {r["prompt"] for r in ArithmeticTask(seed=9).records("test", 500)}
    assert not other & set(prompts["train"])


def test_arithmetic_options_respected():
    task = ArithmeticTask(seed=2, min_ops=3, max_ops=3, max_operand=5, ops="+-", max_value=20)
    for record in task.records("train", 100):
        check_record(record, task)
        assert "*" not in record["prompt"]


def test_arithmetic_errors():
    tiny = ArithmeticTask(min_ops=1, max_ops=1, max_operand=2, ops="+", max_value=9)
    assert tiny.space_size() == 4
    with pytest.raises(ValueError, match="only 4 problems"):
        tiny.records("test", 5)
    with pytest.raises(ValueError, match="too small"):
        ArithmeticTask(min_ops=1, max_ops=2, max_operand=2, ops="+", max_value=9).records("test", 5)
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().records("valid", 1)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="+/")
    with pytest.raises(ValueError, match="min_ops"):
        ArithmeticTask(min_ops=3, max_ops=2)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_jsonl_with_field_mapping(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"question": "1+1?", "solution": "<think>1+1=2</think><answer>2</answer>", "final": 2},
            "",
            {"question": "2*3?", "solution": "six", "final": "6", "extra": 1},
        ],
    )
    fields = {"prompt": "question", "completion": "solution", "answer": "final"}
    result = load_records(str(path), "sft", fields=fields)
    assert isinstance(result, LoadResult) and result.n_skipped == 0 and result.errors == []
    assert result.records[0] == {
        "prompt": "1+1?",
        "completion": "<think>1+1=2</think><answer>2</answer>",
        "answer": "2",
    }
    assert result.records[1]["answer"] == "6" and "extra" not in result.records[1]
    rl = load_records(str(path), "rl", fields={"prompt": "question", "answer": "final"})
    assert [r["answer"] for r in rl.records] == ["2", "6"]


def test_load_optional_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": 3.0}])
    assert load_records(str(path), "rl").records == [{"prompt": "p", "answer": "3"}]
    with pytest.raises(RecordError, match="completion"):
        load_records(str(path), "sft")


@pytest.mark.parametrize(
    "bad_line, field",
    [
        ('{"prompt": "p", "answer": ', "invalid JSON"),
        ('{"answer": "1"}', "prompt"),
        ('{"prompt": "", "answer": "1"}', "prompt"),
        ('{"prompt": 5, "answer": "1"}', "prompt"),
        ('{"prompt": "p"}', "answer"),
        ('{"prompt": "p", "answer": true}', "answer"),
        ('["not", "an", "object"]', "object"),
    ],
)
def test_malformed_line_names_file_line_field(tmp_path, bad_line, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, bad_line, {"prompt": "b", "answer": 2}])
    with pytest.raises(RecordError) as info:
        load_records(str(path), "rl")
    assert isinstance(info.value, ValueError)
    assert f"{path}:2" in str(info.value) and field in str(info.value)


def test_mapped_field_error_names_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "final": "1"}, {"q": "y"}])
    with pytest.raises(RecordError, match=r"d\.jsonl:2: field 'answer' \(column 'final'\) missing"):
        load_records(str(path), "rl", fields={"prompt": "q", "answer": "final"})


def test_skip_mode_counts(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "a", "answer": "1"},
            "{oops",
            {"prompt": "b"},
            {"prompt": "c", "answer": "3"},
            {"answer": "4"},
        ],
    )
    result = load_records(str(path), "rl", on_error="skip")
    assert [r["prompt"] for r in result.records] == ["a", "c"]
    assert result.n_skipped == 3
    assert len(result.errors) == 3 and ":2:" in result.errors[0] and ":5:" in result.errors[2]


def test_json_array_and_parquet(tmp_path):
    rows = [{"prompt": "a", "completion": "c1"}, {"prompt": "b", "completion": "c2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_records(str(tmp_path / "d.json"), "sft").records == rows
    pd.DataFrame({"q": ["a", "b", ""], "final": [1, 2, 3]}).to_parquet(tmp_path / "d.parquet")
    fields = {"prompt": "q", "answer": "final"}
    with pytest.raises(RecordError, match=r"d\.parquet: row 3: field 'prompt'"):
        load_records(str(tmp_path / "d.parquet"), "rl", fields=fields)
    result = load_records(str(tmp_path / "d.parquet"), "rl", fields=fields, on_error="skip")
    assert result.records == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    assert result.n_skipped == 1


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(ValueError, match="kind"):
        load_records(str(path), "dpo")
    with pytest.raises(ValueError, match="on_error"):
        load_records(str(path), "rl", on_error="ignore")
    with pytest.raises(ValueError, match="unknown canonical"):
        load_records(str(path), "rl", fields={"question": "q"})
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"), "rl")
    (tmp_path / "d.csv").write_text("prompt,answer\na,1\n")
    with pytest.raises(ValueError, match="suffix"):
        load_records(str(tmp_path / "d.csv"), "rl")


def test_missing_datasets_package(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install corrpo\[hf\]"):
        load_records("someone/some-dataset", "rl")


def test_hf_dataset(monkeypatch):
    """A Hugging Face name goes to ``datasets.load_dataset(name, split=split)`` (faked: no network)."""
    import sys
    import types

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"problem": "1+1", "solution": 2}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = load_records("org/math", "rl", fields={"prompt": "problem", "answer": "solution"}, split="test")
    assert calls == [("org/math", "test")]
    assert result.records == [{"prompt": "1+1", "answer": "2"}]
