"""Shared test set-up: everything offline, deterministic, on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from corrpo.models.loading import TinyArchitecture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# benchmarks/ holds what the tests share with the benchmarks (a benchmark imports nothing from tests/): the
# shrunken tiny run (tiny_runs), the hostile completions and compute_floor. Appended: it shadows no installed module.
sys.path.append(str(REPO / "benchmarks"))
from tiny_runs import TINY_FAST_ARGS, run_tiny  # noqa: E402, F401 -- tests import both from conftest

# The 2-layer, 32-wide policy that the tests building a CorrPOModule directly (no CLI) share.
TINY_ARCH = TinyArchitecture(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=256)  # fmt: skip


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
