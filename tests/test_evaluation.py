"""model.eval: pass@k (the unbiased estimator) / mean@k / greedy on the test split and on a user eval file, the
generations saved as jsonl through the run folder, results.json recording method, seeds and eval settings."""

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import run_tiny

from corrpo.runs.run_folder import RunFolder
from corrpo.training.evaluation import EvalConfig, pass_at_k, reported_ks, sample_metrics


def brute_force_pass_at_k(scores: list[float], k: int) -> float:
    """The fraction of all k-subsets of the samples holding at least one correct one (what pass@k estimates)."""
    subsets = list(itertools.combinations(scores, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_against_a_hand_computation():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(5, 3, 1) == pytest.approx(0.6)
    correct = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    sums = sample_metrics(correct, 4)
    assert reported_ks(4) == [1, 2, 4] and reported_ks(6) == [1, 2, 4, 6] and reported_ks(1) == [1]
    assert sums["scored"] == 3
    assert sums["pass@1"] / 3 == pytest.approx((0.25 + 0.5 + 0) / 3) == pytest.approx(sums["mean@4"] / 3)
    assert sums["pass@2"] / 3 == pytest.approx((0.5 + 5 / 6 + 0) / 3)
    assert sums["pass@4"] / 3 == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError, match="eval.temperature"):
        EvalConfig(temperature=0)


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory) -> Path:
    from corrpo.data.arithmetic import ArithmeticTask

    root = tmp_path_factory.mktemp("eval_run")
    bench = root / "my_bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in ArithmeticTask(seed=5).records("test", 6)))
    cli = run_tiny(
        root / "runs",
        "--data.n_test=8",
        "--model.eval.k=4",
        "--model.eval.temperature=0.7",
        "--model.eval.every_n_steps=4",
        f"--model.eval.files=[{bench}]",
    )
    return Path(cli.trainer.default_root_dir)


def test_eval_at_k_writes_generations_and_the_pass_at_k_figures(eval_run):
    run = RunFolder(eval_run)
    assert run.eval_generations().is_file()
    rows = run.read_eval_generations()
    results = run.read_results()
    assert results["method"] == "grpo" and results["seeds"]["seed_everything"] == 0
    assert results["eval_settings"]["k"] == 4 and results["eval_settings"]["temperature"] == 0.7
    whens = [e["when"] for e in results["test_accuracy"]]
    assert whens == ["start", "periodic", "sft_end", "periodic", "end"]  # periodic at batches 4 and 8
    entries = results["eval"]
    assert {(e["when"], e["split"]) for e in entries} >= {("start", "test"), ("end", "my_bench"), ("periodic", "test")}

    # every figure recomputed from the saved generations, by brute force over subsets
    groups = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["mode"] == "T=0.7":
            groups[(row["step"], row["when"], row["split"])][row["prompt"]].append(row["correct"])
    assert all(len(s) == 4 for g in groups.values() for s in g.values())
    for entry in entries:
        prompts = [s for s in groups[(entry["step"], entry["when"], entry["split"])].values() if None not in s]
        assert entry["scored"] == len(prompts) > 0
        for k in (1, 2, 4):
            expected = sum(brute_force_pass_at_k(s, k) for s in prompts) / len(prompts)
            assert entry[f"pass@{k}"] == pytest.approx(expected)
        assert entry["mean@4"] == pytest.approx(sum(sum(s) / 4 for s in prompts) / len(prompts))
        assert 0.0 <= entry["greedy_accuracy"] <= 1.0 and not math.isnan(entry["greedy_accuracy"])
    greedy = [r for r in rows if r["mode"] == "greedy" and r["split"] == "my_bench"]
    assert len(greedy) == 6 * 5 and {"prompt", "answer", "completion", "correct", "sample"} <= set(greedy[0])
    test_greedy_end = [r for r in rows if r["mode"] == "greedy" and r["split"] == "test" and r["when"] == "end"]
    end_accuracy = [e for e in results["test_accuracy"] if e["when"] == "end"][0]["accuracy"]
    assert sum(r["correct"] for r in test_greedy_end) / len(test_greedy_end) == pytest.approx(end_accuracy)


def test_eval_at_k_does_not_change_the_training_run(eval_run, tmp_path):
    """Sampling the k completions uses a copy of the RNG streams: the same run without model.eval ends with the
    same weights."""
    import torch

    plain = run_tiny(tmp_path / "runs", "--data.n_test=8", "--trainer.logger=false")
    with_eval = RunFolder(eval_run).policy
    from safetensors.torch import load_file

    (a,) = with_eval.glob("*.safetensors")
    expected = load_file(str(a))
    got = {k: v for k, v in plain.model.policy.state_dict().items() if k in expected}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
