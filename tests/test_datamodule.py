"""ReasoningDataModule: step-indexed phase batches, disjoint held-out sets, user files, clear errors."""

import json

import pytest

from corrpo.data.datamodule import ReasoningDataModule, StepBatches, StepStream


def small(**kwargs) -> ReasoningDataModule:
    opts = dict(
        n_train=300,
        sft_steps=3,
        rl_steps=2,
        sft_batch_size=4,
        rl_batch_size=2,
        n_probe=5,
        n_test=7,
    )
    opts.update(kwargs)
    return ReasoningDataModule(**opts)


def test_batches_follow_the_phases_and_are_reproducible_from_the_index():
    dm = small()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert [b["phase"] for b in batches] == ["sft"] * 3 + ["rl"] * 2
    assert [b["step"] for b in batches] == [0, 1, 2, 3, 4]
    assert len(batches[0]["prompt"]) == 4 and "completion" in batches[0]
    assert len(batches[3]["prompt"]) == 2 and "answer" in batches[3]
    again = small().step_batches()
    assert again[4] == batches[4] and again[1] == batches[1]
    assert small(seed=1).step_batches()[0] != batches[0]


def test_the_stream_resumes_at_a_step_and_shards_whole_prompts_across_ranks():
    steps = small().step_batches()
    resumed = list(StepStream(steps, start=3))
    assert [b["step"] for b in resumed] == [3, 4] and resumed[0] == steps[3]
    shards = [list(StepStream(steps, rank=r, world_size=2)) for r in range(2)]
    for index in range(len(steps)):
        whole, parts = steps[index], [shards[r][index] for r in range(2)]
        assert all(p["step"] == index and p["phase"] == whole["phase"] for p in parts)
        assert parts[0]["prompt"] + parts[1]["prompt"] == whole["prompt"]
        assert len(parts[0]["prompt"]) == len(parts[1]["prompt"])
    with pytest.raises(ValueError, match="data.rl_batch_size=2 must be divisible"):
        list(StepStream(steps, start=3, rank=0, world_size=4))
    with pytest.raises(ValueError, match="resume at step 9"):
        StepStream(steps, start=9)


def test_held_out_sets_never_meet_training_prompts():
    dm = small()
    pools = dm.pools()
    train = {r["prompt"] for r in pools["sft"]} | {r["prompt"] for r in pools["rl"]}
    assert len(pools["probe"]) == 5 and len(pools["test"]) == 7
    assert not train & {r["prompt"] for r in pools["probe"]}
    assert not train & {r["prompt"] for r in pools["test"]}


def test_epochs_cycle_through_every_record_once():
    records = [{"prompt": str(i), "completion": "c"} for i in range(5)]
    steps = StepBatches(records, [], sft_steps=5, rl_steps=0, sft_batch_size=2, rl_batch_size=1, seed=0)
    seen = [p for i in range(5) for p in steps[i]["prompt"]]
    assert sorted(seen[:5]) == sorted(r["prompt"] for r in records)
    assert sorted(seen[5:10]) == sorted(r["prompt"] for r in records)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_user_files_with_field_mapping_and_held_out_splits(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"q": f"p{i}", "sol": f"s{i}"} for i in range(20)])
    rl = write_jsonl(tmp_path / "rl.jsonl", [{"q": f"r{i}", "final": i} for i in range(30)])
    dm = small(
        sft_source=str(sft),
        rl_source=str(rl),
        sft_fields={"prompt": "q", "completion": "sol"},
        rl_fields={"prompt": "q", "answer": "final"},
    )
    pools = dm.pools()
    assert len(pools["sft"]) == 15 and len(pools["probe"]) == 5
    assert len(pools["rl"]) == 23 and len(pools["test"]) == 7
    assert not {r["prompt"] for r in pools["rl"]} & {r["prompt"] for r in pools["test"]}
    assert all(isinstance(r["answer"], str) for r in pools["test"])


def test_malformed_row_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    # distinct prompts: two repeated ones would all be held out as probes, leaving no SFT record (an error)
    rows = [{"prompt": f"a{i}", "completion": "b"} for i in range(10)] + ["{not json"]
    rows += [{"prompt": f"c{i}", "completion": "d"} for i in range(10)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl:11"):
        small(sft_source=str(path)).pools()
    dm = small(sft_source=str(path), on_error="skip")
    dm.pools()
    assert dm.n_skipped == 1


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="data.on_error"):
        ReasoningDataModule(on_error="ignore")
    with pytest.raises(ValueError, match="data.rl_batch_size"):
        ReasoningDataModule(rl_batch_size=0)
    with pytest.raises(ValueError, match="rl_steps > 0"):
        StepBatches([], [], sft_steps=0, rl_steps=1, sft_batch_size=1, rl_batch_size=1, seed=0)


def host_stub(steps_done: int = 0):
    """A module offering the TrainingHost contract the data module reads ``steps_done`` through."""
    from types import SimpleNamespace

    from corrpo.training.host import HOST_ATTRIBUTES
    from corrpo.training.phases import PhaseSchedule

    attributes = dict.fromkeys(HOST_ATTRIBUTES) | {"schedule": PhaseSchedule(3, 2), "steps_done": steps_done}
    return SimpleNamespace(**attributes)


def test_a_batch_size_that_does_not_split_across_processes_fails_before_the_first_step():
    from types import SimpleNamespace

    dm = small()  # sft_batch_size=4, rl_batch_size=2
    dm.trainer = SimpleNamespace(lightning_module=host_stub(), global_rank=0, world_size=4)
    with pytest.raises(ValueError, match=r"data.rl_batch_size=2 must be divisible by the number of processes \(4\)"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(lightning_module=host_stub(), global_rank=1, world_size=2)
    assert [b["step"] for b in dm.train_dataloader()] == [0, 1, 2, 3, 4]
