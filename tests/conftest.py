"""Shared test set-up: everything offline, deterministic, on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from corrpo.models.loading import TinyArchitecture  # noqa: E402

# The 2-layer, 32-wide policy that the tests building a CorrPOModule directly (no CLI) share.
TINY_ARCH = TinyArchitecture(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=256)  # fmt: skip

REPO = Path(__file__).resolve().parents[1]

# A shrunken configs/tiny.yaml: both phases in a few steps, every tracker hook exercised.
TINY_FAST_ARGS = [
    "--model.tiny.hidden_size=32",
    "--model.tiny.num_hidden_layers=2",
    "--model.tiny.intermediate_size=64",
    "--model.sft.steps=6",
    "--model.sft.warmup_steps=0",
    "--model.rl.steps=3",
    "--model.rl.num_generations=4",
    "--model.rl.sampling.max_new_tokens=24",
    "--model.eval_batch_size=16",
    "--data.sft_batch_size=8",
    "--data.rl_batch_size=2",
    "--data.n_test=16",
    "--data.n_probe=8",
    "--data.n_train=200",
    "--trainer.callbacks.every_n_steps=2",
    "--trainer.callbacks.batch_size=4",
]


def run_tiny(root: Path, *extra: str, subcommand: str = "fit"):
    """Run ``corrpo <subcommand> --config configs/tiny.yaml`` shrunken, in-process; returns the CLI."""
    from corrpo.cli import build_cli

    args = [subcommand, "--config", str(REPO / "configs" / "tiny.yaml"), *TINY_FAST_ARGS]
    args += [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *extra]
    return build_cli(args)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The folder of one shrunken tiny run through both phases (shared by the tests that read a run)."""
    root = tmp_path_factory.mktemp("tiny_run")
    cli = run_tiny(root, "--trainer.callbacks.anatomy=true")  # the anatomy columns too (tests/test_anatomy_tracker.py)
    return Path(cli.trainer.default_root_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add OpenMP overhead (100x slower on a busy 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def csv_metrics(run: Path) -> dict[int, dict]:
    """A multi-process run's logged scalars by step, from its CSVLogger ``metrics.csv`` beside the run folder."""
    import csv

    (path,) = (run.parent / "csv").rglob("metrics.csv")
    out: dict[int, dict] = {}
    for row in csv.DictReader(path.open()):
        out.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    return out


@pytest.fixture
def packings(monkeypatch) -> list[tuple[int, int]]:
    """``(sequences, packed rows)`` of every packed forward that runs."""
    import corrpo.models.packing as packing

    seen, real = [], packing.packed_width

    def spy(lengths, hidden_size):
        width, rows = real(lengths, hidden_size)
        seen.append((len(lengths), len(rows)))
        return width, rows

    monkeypatch.setattr(packing, "packed_width", spy)
    return seen
