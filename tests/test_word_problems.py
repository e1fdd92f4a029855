"""The arithmetic task told in words: the same problems, splits and answers as the digits, verifiable prose traces."""

import re

import pytest

from corrpo.data.arithmetic import SPLITS, ArithmeticTask, split_of
from corrpo.data.datamodule import ReasoningDataModule
from corrpo.data.word_problems import NAMES, OBJECTS, word_record
from corrpo.models.loading import build_char_tokenizer
from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.answer import extract_answer
from corrpo.rewards.format import format_reward

EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
COMPLETION = re.compile(r"<think>(.*)</think><answer>(\d+)</answer>")
DIGITS_STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)")


def chain_of(completion: str) -> list[tuple[int, str, int, int]]:
    """The ``a op b = c`` steps of a completion's think block, in order."""
    think = COMPLETION.fullmatch(completion)
    assert think, completion
    return [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(think.group(1))]


def test_words_are_the_digits_problems_in_the_same_order_splits_and_answers():
    for seed in (0, 7):
        digits_task, words_task = ArithmeticTask(seed=seed), ArithmeticTask(seed=seed, render="words")
        prompts = {}
        for split in SPLITS:
            digits, words = digits_task.records(split, 120), words_task.records(split, 120)
            for d, w in zip(digits, words, strict=True):
                assert w["answer"] == d["answer"]
                assert split_of(d["prompt"]) == split
                digits_steps = [(int(a), op, int(b), int(c)) for a, op, b, c in DIGITS_STEP.findall(d["completion"])]
                assert chain_of(w["completion"]) == digits_steps
            prompts[split] = {w["prompt"] for w in words}
            assert len(prompts[split]) == 120
        assert not prompts["train"] & prompts["probe"] and not prompts["train"] & prompts["test"]
        assert not prompts["probe"] & prompts["test"]


def test_every_step_is_correct_chained_and_the_answer_tag_exact():
    task = ArithmeticTask(seed=1, render="words", min_ops=1, max_ops=6, max_operand=12, max_value=150)
    records = task.records("train", 300) + task.records("test", 50)
    for record in records:
        steps = chain_of(record["completion"])
        assert task.min_ops <= len(steps) <= task.max_ops
        start = int(re.search(r"\d+", record["prompt"]).group())
        assert steps[0][0] == start
        for i, (a, op, b, c) in enumerate(steps):
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert 0 <= c <= task.max_value and 1 <= b <= task.max_operand
            assert i == 0 or a == steps[i - 1][3]
            if op == "*":  # the factor is explicit in the question
                named = {2: "doubles", 3: "triples"}.get(b)
                assert f"by {b}" in record["prompt"] or f"{b} times" in record["prompt"] or named in record["prompt"]
        assert record["completion"].endswith(f"</think><answer>{record['answer']}</answer>")
        assert record["answer"] == str(steps[-1][3]) == extract_answer(record["completion"])
    completions = [r["completion"] for r in records]
    assert format_reward([], completions) == [1.0] * len(records)
    assert accuracy_reward([], completions[:20], [r["answer"] for r in records[:20]]) == [1.0] * 20


def test_text_varies_in_words_and_stays_inside_the_alphabet():
    task = ArithmeticTask(seed=0, render="words")
    records = task.records("train", 50)
    text = " ".join(r["prompt"] + " " + r["completion"] for r in records)
    words = set(re.findall(r"[A-Za-z']+", text))
    assert len(words) > 100  # the brief's floor is ~20: names, objects, verbs, connectives
    assert len({name for name, _ in NAMES if name in words}) >= 15
    assert len({plural for _, plural in OBJECTS if plural in words}) >= 15
    assert set(text) <= set(task.alphabet())
    char = build_char_tokenizer()  # the tiny policies' default tokenizer covers it: no <unk>
    ids = char(text, add_special_tokens=False)["input_ids"]
    assert char.unk_token_id not in ids and char.decode(ids) == text
    assert "\n" not in text and "  " not in text


def test_wording_is_a_pure_function_of_the_chain():
    chain = [("+", 3, 7), ("*", 2, 14), ("-", 5, 9)]
    record = word_record(4, chain)
    assert record == word_record(4, chain)
    assert chain_of(record["completion"]) == [(4, "+", 3, 7), (7, "*", 2, 14), (14, "-", 5, 9)]
    assert record["answer"] == "9" and record["prompt"].endswith("?")
    a = ArithmeticTask(seed=3, render="words")
    assert a.records("train", 40) == ArithmeticTask(seed=3, render="words").records("train", 40)
    assert a.records("train", 60)[:40] == a.records("train", 40)
    with pytest.raises(ValueError, match="at least one operation"):
        word_record(4, [])


def test_digits_records_unchanged():
    """Bit-identical to the records before ``render`` existed (literals taken from that version)."""
    assert ArithmeticTask(seed=0).records("train", 3) == [
        {"prompt": "9 -6 -2 +2 -2 =", "completion": "<think>9-6=3 3-2=1 1+2=3 3-2=1</think><answer>1</answer>",
         "answer": "1"},
        {"prompt": "3 *6 +3 *1 -6 =", "completion": "<think>3*6=18 18+3=21 21*1=21 21-6=15</think><answer>15</answer>",
         "answer": "15"},
        {"prompt": "3 -3 +2 *9 =", "completion": "<think>3-3=0 0+2=2 2*9=18</think><answer>18</answer>",
         "answer": "18"},
    ]  # fmt: skip
    assert ArithmeticTask(seed=5, max_operand=12, max_ops=5).records("test", 2) == [
        {"prompt": "4 +1 *4 -11 =", "completion": "<think>4+1=5 5*4=20 20-11=9</think><answer>9</answer>",
         "answer": "9"},
        {"prompt": "9 -3 *2 +10 =", "completion": "<think>9-3=6 6*2=12 12+10=22</think><answer>22</answer>",
         "answer": "22"},
    ]  # fmt: skip
    assert ArithmeticTask(render="digits").records("probe", 30) == ArithmeticTask().records("probe", 30)
    with pytest.raises(ValueError, match="render"):
        ArithmeticTask(render="prose")


def test_data_module_serves_word_problems():
    data = ReasoningDataModule(arithmetic=ArithmeticTask(render="words"), n_train=40, n_probe=8, n_test=8, sft_steps=2)
    pools = data.pools()
    assert all(r["prompt"].endswith("?") and "<think>" in r["completion"] for r in pools["sft"] + pools["probe"])
    held = {r["prompt"] for r in pools["probe"]} | {r["prompt"] for r in pools["test"]}
    assert len(pools["sft"]) == 40 and not held & {r["prompt"] for r in pools["sft"]}
    assert ArithmeticTask(render="words").corpus(3) == [
        text for r in ArithmeticTask(render="words").records("train", 3) for text in (r["prompt"], r["completion"])
    ]
