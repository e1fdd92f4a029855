"""An export that always completes, and evaluations that survive a resume (issue 28, items 2 and 7).

One uninterrupted run against the same run cut in three: stopped after 4 of 6 steps (``trainer.max_steps``, at a
periodic evaluation's step), resumed until the disk fills while ``policy/`` is written (training done, export not;
the run's 6 steps are no multiple of configs/tiny.yaml's checkpoint interval of 100), resumed again. The last resume
must finish the export, and every evaluation row, file and weight must equal the uninterrupted run's. The
uninterrupted run also has its wandb completions table fail (a media folder removed): a warning, not the end.
"""

import errno
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_tiny
from lightning.pytorch.loggers import WandbLogger
from safetensors.torch import load_file

import corrpo.module
from callbacks.loggers import side_effect
from corrpo.runs.atomic import atomic_folder, remove_leftovers, write_text_atomic
from corrpo.runs.run_folder import RunFolder

STEPS = ["--model.sft.steps=3", "--model.rl.steps=3", "--model.rl.inversion.coef=0.5", "--model.rl.lr=1e-3"]
# periodic evaluations at steps 2 and 4 (sampled pass@2 too: it draws from the RNG), every completion saved
EVAL = ["--model.eval.every_n_steps=2", "--model.eval.k=2", "--model.eval.save_generations=true"]


def _no_space_in_final_export(real_export):
    def export(model, tokenizer, folder, state_dict=None):
        if Path(folder).name.startswith(".policy."):  # the final export's temp folder, not policy-sft's
            model.config.save_pretrained(folder)  # what a full disk left in the issue: config.json alone
            raise OSError(errno.ENOSPC, "No space left on device (emulated)")
        return real_export(model, tokenizer, folder, state_dict=state_dict)

    return export


def _media_folder_gone(*args, **kwargs):
    raise FileNotFoundError("/tmp/wandb-media/xyz.table.json: No such file or directory")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch.setattr(WandbLogger, "log_table", _media_folder_gone)
        whole = Path(run_tiny(tmp_path_factory.mktemp("whole"), *STEPS, *EVAL).trainer.default_root_dir)
    root = tmp_path_factory.mktemp("split")
    stopped = Path(run_tiny(root, *STEPS, *EVAL, "--trainer.max_steps=4").trainer.default_root_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corrpo.module, "export_policy", _no_space_in_final_export(corrpo.module.export_policy))
        with pytest.raises(OSError, match="No space left on device"):
            run_tiny(root, *STEPS, *EVAL, "--ckpt_path=last")
    after_failure = {
        "files": sorted(p.name for p in stopped.iterdir()),
        "checkpoint": torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True),
    }
    resumed = run_tiny(root, *STEPS, *EVAL, "--ckpt_path=last")
    assert Path(resumed.trainer.default_root_dir) == stopped
    return whole, stopped, after_failure, [str(w.message) for w in caught]


def test_a_failed_wandb_table_is_a_warning_and_the_run_finishes(runs):
    whole, _, _, messages = runs
    assert any("completions table" in m and "FileNotFoundError" in m and "training goes on" in m for m in messages)
    assert RunFolder(whole).results.is_file() and (RunFolder(whole).policy / "model.safetensors").is_file()


def test_a_run_whose_export_failed_is_unfinished_with_its_final_checkpoint_saved(runs):
    _, _, after_failure, _ = runs
    checkpoint = after_failure["checkpoint"]
    assert checkpoint["corrpo"]["steps_done"] == 6 and checkpoint["global_step"] == 6  # training itself ended
    assert "results.json" not in after_failure["files"], "the stopped segment's results.json must not look final"
    assert not [name for name in after_failure["files"] if ".partial-" in name], "a failed export leaves no temp"


def test_the_resume_of_a_run_whose_export_failed_finishes_the_export(runs):
    whole, split, _, _ = runs
    results = RunFolder(split).read_results()
    assert results["steps_run"] == {"sft": 3, "rl": 3} and not results["stopped_early"]
    a, b = (
        load_file(RunFolder(whole).policy / "model.safetensors"),
        load_file(RunFolder(split).policy / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in split.iterdir() if ".partial-" in p.name or ".old-" in p.name], "no temp copy left"


def test_evaluations_and_their_rows_are_identical_across_the_resumes(runs):
    whole, split, _, _ = runs
    one, cut = RunFolder(whole).read_results(), RunFolder(split).read_results()
    points = [(e["when"], e["step"]) for e in one["test_accuracy"]]
    assert points == [("start", 0), ("periodic", 2), ("sft_end", 3), ("periodic", 4), ("end", 6)]
    assert cut["test_accuracy"] == one["test_accuracy"]  # the periodic one at the stop's step 4 included, once
    assert cut["eval"] == one["eval"] and any("pass@2" in e for e in one["eval"])
    assert RunFolder(split).read_eval_generations() == RunFolder(whole).read_eval_generations()  # none repeated
    assert RunFolder(split).emergence.read_text() == RunFolder(whole).emergence.read_text()


def test_the_sft_policy_is_exported_at_the_boundary(runs):
    whole, split, _, _ = runs
    sft = load_file(RunFolder(whole).policy_sft / "model.safetensors")
    final = load_file(RunFolder(whole).policy / "model.safetensors")
    assert any(not torch.equal(sft[k], final[k]) for k in sft), "RL moved the weights after policy-sft/"
    assert (RunFolder(whole).policy_sft / "config.json").is_file()
    again = load_file(RunFolder(split).policy_sft / "model.safetensors")
    assert all(torch.equal(sft[k], again[k]) for k in sft)


# ------------------------------------------------------------------------------------------- the pieces
def test_a_failed_atomic_folder_write_keeps_the_old_folder_and_leaves_no_temp(tmp_path):
    target = tmp_path / "policy"
    with atomic_folder(target) as partial:
        (partial / "weights").write_text("old")
    with pytest.raises(OSError), atomic_folder(target) as partial:
        (partial / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in target.iterdir()] == ["weights"] and (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
    with atomic_folder(target) as partial:
        (partial / "weights").write_text("new")
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_what_killed_atomic_writers_left_is_removed(tmp_path):
    (tmp_path / ".policy.partial-123").mkdir()
    (tmp_path / ".policy.old-123").mkdir()
    (tmp_path / ".results.json.partial-9").write_text("{")
    (tmp_path / "results.json").write_text("{}")
    assert len(remove_leftovers(tmp_path)) == 3 and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_results_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_text_atomic(path, "old")
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_eval_rows_of_evaluation_points_after_the_checkpoint_are_dropped(tmp_path):
    run = RunFolder(tmp_path)
    rows = [{"when": w, "step": s, "completion": c} for w, s, c in [("start", 0, "a"), ("periodic", 4, "b"),
                                                                    ("end", 6, "c")]]  # fmt: skip
    run.append_eval_generations(rows)
    (tmp_path / "results.json").write_text("{}")
    run.reopen([{"when": "start", "step": 0}, {"when": "periodic", "step": 4}])
    assert run.read_eval_generations() == rows[:2] and not run.results.exists()


def test_a_failing_logging_side_effect_warns_naming_it():
    with pytest.warns(UserWarning, match=r"the thing not logged \(FileNotFoundError: gone\); training goes on"):
        with side_effect("the thing"):
            raise FileNotFoundError("gone")
