"""The shrunken tiny run: ``configs/tiny.yaml`` through both phases in a few steps, every tracker hook exercised.

One definition for the tests (``tests/conftest.py`` puts this folder on ``sys.path`` and hands it on) and for the
benchmarks that train such a run (``faults.py``, ``resume_equality.py``): benchmarks import nothing from tests/, so
what both need lives here.
"""

from __future__ import annotations

from pathlib import Path

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
    # imported here, not above: every test session imports this module, and most tests never build the CLI
    from corrpo.cli import build_cli

    args = [subcommand, "--config", str(REPO / "configs" / "tiny.yaml"), *TINY_FAST_ARGS]
    args += [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false", *extra]
    return build_cli(args)
