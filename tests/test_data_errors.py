"""Data errors that used to be unclear: each names the file (and line), and ``on_error: skip`` skips bad lines."""

import json
import sys
import types

import pytest

from corrpo.data.datamodule import ReasoningDataModule
from corrpo.data.records import RecordError, load_records


def _write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _row(i: int) -> bytes:
    return json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "answer": str(i)}).encode()


def test_a_non_utf8_byte_names_the_file_and_line_and_skip_mode_skips_only_that_line(tmp_path):
    lines = [_row(i) for i in range(5)]
    lines[3] = b'{"prompt": "caf\xe9", "completion": "x"}'  # latin-1, not UTF-8
    path = _write_lines(tmp_path / "latin1.jsonl", lines)
    with pytest.raises(RecordError, match=r"latin1\.jsonl:4: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_records(str(path), "sft")
    result = load_records(str(path), "sft", on_error="skip")
    assert [r["prompt"] for r in result.records] == ["p0", "p1", "p2", "p4"]
    assert result.n_skipped == 1 and "latin1.jsonl:4" in result.errors[0]


def test_a_non_utf8_byte_in_a_json_array_names_the_line(tmp_path):
    path = tmp_path / "array.json"
    path.write_bytes(b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "\xff", "completion": "b"}\n]\n')
    with pytest.raises(RecordError, match=r"array\.json:3: not UTF-8 text \(byte 0xff at column 13\)"):
        load_records(str(path), "sft")


def test_a_450_digit_integer_answer_is_read_exactly(tmp_path):
    big = int("7" * 450)  # float() of it overflows
    path = _write_lines(tmp_path / "big.jsonl", [json.dumps({"prompt": "p", "answer": big}).encode()])
    assert load_records(str(path), "rl").records[0]["answer"] == "7" * 450


@pytest.mark.parametrize(
    "value, reason",
    [("9" * 5000, r"ValueError: Exceeds the limit \(4300 digits\)"), ("[" * 100_000 + "]" * 100_000, "RecursionError")],
    ids=["5000-digit-number", "100k-deep-nesting"],
)
def test_json_python_cannot_read_names_the_file_and_line_and_skip_mode_skips_it(tmp_path, value, reason):
    lines = [_row(0), b'{"prompt": "x", "completion": "y", "answer": ' + value.encode() + b"}", _row(2)]
    path = _write_lines(tmp_path / "hostile.jsonl", lines)
    with pytest.raises(RecordError, match=rf"hostile\.jsonl:2: JSON that cannot be read \({reason}"):
        load_records(str(path), "rl")
    result = load_records(str(path), "rl", on_error="skip")
    assert [r["prompt"] for r in result.records] == ["p0", "p2"] and result.n_skipped == 1
    array = tmp_path / "hostile.json"
    array.write_bytes(b"[" + b",".join(lines) + b"]")
    with pytest.raises(RecordError, match=rf"hostile\.json: JSON that cannot be read \({reason}"):
        load_records(str(array), "rl")


def test_an_empty_file_is_named_as_empty(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    dm = ReasoningDataModule(sft_source=str(empty), sft_steps=2, n_probe=8)
    with pytest.raises(ValueError, match=r"data\.sft_source: .*empty\.jsonl holds no records: it is empty"):
        dm.pools()


def test_a_file_whose_rows_are_all_skipped_says_so(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [b"{nope", b"[1]"])
    dm = ReasoningDataModule(sft_source=str(path), sft_steps=2, on_error="skip")
    with pytest.raises(ValueError, match=r"bad\.jsonl holds no records: all 2 rows are malformed.*bad\.jsonl:1"):
        dm.pools()


def test_rl_rows_that_all_duplicate_held_out_test_prompts_are_counted_not_called_missing(tmp_path):
    path = _write_lines(tmp_path / "rl.jsonl", [_row(i) for i in range(300)])
    dm = ReasoningDataModule(rl_source=str(path), test_source=str(path), n_test=300, rl_steps=2)
    with pytest.raises(ValueError, match=r"data\.rl_source: 300 read from .*rl\.jsonl, all 300 duplicate probe/test"):
        dm.pools()


def test_holding_out_more_records_than_a_file_has_names_the_file(tmp_path):
    path = _write_lines(tmp_path / "few.jsonl", [_row(i) for i in range(5)])
    dm = ReasoningDataModule(sft_source=str(path), sft_steps=2, n_probe=8)
    with pytest.raises(
        ValueError, match=r"data\.sft_source: cannot hold out 8 probe records from the 5 of .*few\.jsonl"
    ):
        dm.pools()


@pytest.mark.parametrize("name", ["train.csv", "data/train.jsonl", "train.parquet", "./train"])
def test_a_missing_local_path_is_no_such_file_not_a_hub_dataset(name, tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a local path must never be looked up on the Hugging Face hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=no_hub))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"data file '{name}': no such file"):
        load_records(name, "rl")
