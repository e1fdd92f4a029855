"""Every listed family end to end: fingerprint a saved checkpoint, train it (SFT then CorR-PO), and refuse
the silent failures (a folder without a tokenizer, a probe set that scores nothing)."""

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import REPO, TINY_ARCH, run_tiny

from corrpo.cli import build_cli
from corrpo.models.loading import build_char_tokenizer, build_tiny_policy, export_policy, load_policy
from corrpo.models.tiny_families import TINY_FAMILY_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")

# A fit shrunk to a couple of steps per phase: the point is that every family trains, not how well.
TWO_STEP_FIT = [
    "--model.sft.steps=2",
    "--model.rl.steps=2",
    "--model.rl.num_generations=2",
    "--model.rl.sampling.max_new_tokens=8",
    "--model.rl.inversion.coef=0.1",
    "--model.rl.inversion.min_tokens=2",
    "--data.n_test=4",
    "--data.n_probe=4",
    "--trainer.callbacks.every_n_steps=100",
]


def _save(family: str, folder: Path) -> Path:
    tokenizer = build_char_tokenizer()
    return export_policy(build_tiny_policy(family, tokenizer, TINY_ARCH), tokenizer, folder)


@pytest.mark.parametrize("family", TINY_FAMILY_NAMES)
def test_validate_fingerprints_a_saved_checkpoint_of_every_family(family, tmp_path, capsys):
    folder = _save(family, tmp_path / family)
    build_cli(["validate", "--config", str(REPO / "configs" / "fingerprint.yaml"), "--model.policy", str(folder),
               f"--trainer.default_root_dir={tmp_path / 'fp'}", "--data.n_probe=4", "--data.n_test=4"])  # fmt: skip
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("inversion/spearman=")]
    assert line
    rho = float(line[0].split()[0].split("=")[1])
    assert math.isfinite(rho) and -1.0 <= rho <= 1.0
    (saved,) = (tmp_path / "fp").rglob("fingerprint.json")
    assert json.loads(saved.read_text())["n_tokens"] > 0


@pytest.mark.parametrize("family", TINY_FAMILY_NAMES)
def test_a_shrunk_corrpo_fit_trains_every_family(family, tmp_path):
    """SFT then GRPO with the CorR-PO term on (onepass strengths of q, v, o on every rollout)."""
    csv_logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
                  "--trainer.log_every_n_steps=1"]  # fmt: skip
    run_tiny(tmp_path, f"--model.policy=tiny-{family}", *TWO_STEP_FIT, *csv_logger)
    metrics = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    bonus = [float(r["rl/rewards/inversion/mean"]) for r in metrics if r.get("rl/rewards/inversion/mean")]
    rho = [float(r["rl/inversion/rollout_spearman"]) for r in metrics if r.get("rl/inversion/rollout_spearman")]
    assert len(bonus) == 2 and all(math.isfinite(b) for b in bonus)  # both RL steps scored their rollouts
    assert rho and all(math.isfinite(r) for r in rho)
    (emergence,) = tmp_path.rglob("emergence.csv")
    events = [r["event"] for r in csv.DictReader(emergence.open())]
    assert events[0] == "start" and events[-1] == "end"


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_folder_without_tokenizer_files_is_an_error_naming_it(family, tmp_path):
    """transformers would build a one-token tokenizer (Qwen2) or ask for sentencepiece (Llama)."""
    folder = _save(family, tmp_path / family)
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            path.unlink()
    with pytest.raises(ValueError, match=f"{folder}.*no tokenizer files"):
        load_policy(str(folder))


def test_a_probe_set_that_scores_no_tokens_is_an_error_not_a_nan_fingerprint(tmp_path, monkeypatch):
    from callbacks.inversion import InversionTracker

    original = InversionTracker._probe_batches

    def nothing_scored(self, trainer, pl_module):
        for enc in original(self, trainer, pl_module):
            yield {**enc, "loss_mask": enc["loss_mask"] & False}

    monkeypatch.setattr(InversionTracker, "_probe_batches", nothing_scored)
    with pytest.raises(ValueError, match="scored 0 tokens"):
        build_cli(["validate", "--config", str(REPO / "configs" / "fingerprint.yaml"), "--model.policy=tiny-qwen2",
                   f"--trainer.default_root_dir={tmp_path}", "--data.n_probe=4", "--data.n_test=4"])  # fmt: skip
    assert not list(tmp_path.rglob("fingerprint.json"))
