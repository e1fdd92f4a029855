"""The run folder: the one owner of its layout, its writers and its readers.

A corrpo run writes everything into one folder, so it can be read, reported on or resumed from that alone::

    <run>/config.yaml       the resolved LightningCLI config (written by the CLI's SaveConfigCallback)
    <run>/emergence.csv     the inversion curve, one tidy row per probe measurement (EMERGENCE_COLUMNS)
    <run>/results.json      method (``sft-only`` when no RL step ran), the steps run of each phase and whether
                            the run stopped early, seeds, test accuracy at start / SFT end / end, eval@k results
                            and settings, skipped updates (+ tags such as coef, wall_s)
    <run>/fingerprint.json  ``corrpo validate``'s one measurement
    <run>/eval_generations.jsonl  every evaluated completion (``model.eval``), one JSON object per line
    <run>/checkpoints/      Lightning checkpoints (last.ckpt, ...)
    <run>/policy/           the exported policy, a Hugging Face folder (``from_pretrained``), written atomically
                            before results.json: a run is finished when results.json exists
    <run>/policy-sft/       the policy as SFT ended, exported at the SFT->RL boundary (a run with both phases)
    <run>/wandb/            the wandb run (offline unless configured online)
    <run>/<name>/version_<n>/  a CSV or TensorBoard logger's own files (metrics.csv, event files), when its
                            save_dir is unset: the CLI puts it in the run folder (a resumed run's logger starts
                            the next version, as Lightning's loggers do)

The module, the tracker, ``corrpo report``, the notebook helpers (:mod:`corrpo.runs.analysis`) and
``benchmarks/compare.py`` all go through :class:`RunFolder`, so a file's name and format live here only.

:func:`run_dir` finds a trainer's folder: ``trainer.default_root_dir``, whatever the loggers, never
``trainer.log_dir`` (a CSV or TensorBoard logger's ``<name>/version_<n>/``, and a broadcast from rank 0: the writers
run on rank 0 only, so under DDP it would pair with whatever collective the other ranks run next and deadlock).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from corrpo.runs.atomic import atomic_folder, remove_leftovers, write_text_atomic

CONFIG_FILE = "config.yaml"
"""The resolved config's file name (the CLI's SaveConfigCallback writes it; resume compares against it)."""

EMERGENCE_COLUMNS = ["step", "batches", "phase", "event", "source", "spearman", "pearson", "strength", "n_tokens"]
"""emergence.csv's columns: optimizer step, train batches done, phase (init|sft|rl), event (start|periodic|
boundary|end), probe source, Spearman rho, Pearson r, strength = -rho, scored tokens. With the tracker's
``anatomy: true`` they are followed by one ``anatomy_<factor>`` column per factor (Spearman(H, factor),
:mod:`corrpo.inversion.anatomy_probe`), in the order the rows hold them."""

SFT_ONLY = "sft-only"
"""results.json's ``method`` of a run that made no RL step (by config, or stopped before RL)."""

ANATOMY_PREFIX = "anatomy_"
"""The prefix of emergence.csv's anatomy columns (``anatomy_<factor>``)."""


@dataclass(frozen=True)
class RunFolder:
    """One run's folder and every file in it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ------------------------------------------------------------------------------------------ paths
    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def emergence(self) -> Path:
        return self.path / "emergence.csv"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def fingerprint(self) -> Path:
        return self.path / "fingerprint.json"

    def eval_generations(self, rank: int = 0) -> Path:
        """Every evaluated completion, one JSON object per line (``model.eval.save_generations``); under DDP rank
        ``r > 0`` writes ``eval_generations.rank<r>.jsonl`` (its share of the prompts)."""
        return self.path / ("eval_generations.jsonl" if rank == 0 else f"eval_generations.rank{rank}.jsonl")

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def policy(self) -> Path:
        return self.path / "policy"

    @property
    def policy_sft(self) -> Path:
        """The policy as the SFT phase ended, exported at the SFT->RL boundary."""
        return self.path / "policy-sft"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    def anatomy_tokens(self, event: str) -> Path:
        """The per-token anatomy table of one probe measurement (``event``: boundary | end | validate)."""
        return self.path / f"anatomy_tokens_{event}.csv"

    @property
    def emergence_png(self) -> Path:
        """``corrpo report``'s figure."""
        return self.path / "emergence.png"

    @property
    def anatomy_png(self) -> Path:
        """``corrpo report``'s anatomy figure (Spearman(H, factor) over training), when the run has the columns."""
        return self.path / "anatomy.png"

    @property
    def summary_md(self) -> Path:
        """``corrpo report``'s page."""
        return self.path / "summary.md"

    def is_run(self) -> bool:
        """The folder holds a run's curve or results."""
        return self.emergence.is_file() or self.results.is_file()

    # ---------------------------------------------------------------------------------------- writers
    def write_emergence(self, rows: Iterable[dict]) -> None:
        """Rewrite emergence.csv whole from ``rows`` (a resumed run's file then holds no row measured after the
        checkpoint it resumed from)."""
        rows = list(rows)
        anatomy = [k for row in rows for k in row if k.startswith(ANATOMY_PREFIX)]
        self.path.mkdir(parents=True, exist_ok=True)
        with self.emergence.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=EMERGENCE_COLUMNS + list(dict.fromkeys(anatomy)))
            writer.writeheader()
            writer.writerows(rows)

    def write_anatomy_tokens(self, event: str, columns: list[str], rows: Iterable[list]) -> None:
        """Write one measurement's per-token table (token, entropy_bits, strength, position, factors...)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.anatomy_tokens(event).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)

    def read_anatomy_tokens(self, event: str):
        """A per-token anatomy table as a pandas frame (FileNotFoundError naming the path when absent)."""
        import pandas as pd

        path = self.anatomy_tokens(event)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the run had no InversionTracker anatomy: true, or no {event}")
        return pd.read_csv(path, keep_default_na=False, na_values=["nan"])

    def write_results(self, results: dict) -> None:
        """Write results.json atomically: it marks a finished run, so it is never seen half-written."""
        write_text_atomic(self.results, json.dumps(results, indent=2))

    def write_policy(self, folder: Path, export: Callable[[Path], object]) -> Path:
        """Export a policy to ``folder`` (:attr:`policy` or :attr:`policy_sft`) atomically: ``export(temp)`` (e.g.
        :func:`corrpo.models.loading.export_policy`) writes a temp sibling, which is fsynced and renamed into place,
        after what a killed export left in the run folder is removed. A failed export (disk full) keeps the old
        folder and leaves no temp copy."""
        for path in remove_leftovers(self.path):
            warnings.warn(f"removed {path}: the temp copy of an export that was killed", stacklevel=2)
        with atomic_folder(folder) as partial:
            export(partial)
        return folder

    def tag_results(self, **tags) -> None:
        """Add ``tags`` (e.g. method, coef, seed, wall_s) to results.json."""
        self.write_results({**self.read_results(), **tags})

    def append_eval_generations(self, rows: Iterable[dict], rank: int = 0) -> None:
        """Append rows (when, step, split, mode, prompt, answer, sample, completion, correct) to the jsonl."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.eval_generations(rank).open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def reopen(self, points: Iterable[dict], rank: int = 0) -> None:
        """A resumed run takes its folder back: an earlier segment's results.json goes (the run is unfinished until
        its end writes results.json again, so a crash of the resumed run never leaves an outdated one looking
        finished), and the eval rows after its checkpoint go (:meth:`keep_eval_generations`)."""
        if rank == 0:
            self.results.unlink(missing_ok=True)
        self.keep_eval_generations(points, rank)

    def keep_eval_generations(self, points: Iterable[dict], rank: int = 0) -> int:
        """Keep only the rows of rank ``rank``'s jsonl whose evaluation point (``when``, ``step``) is in ``points``
        (a resumed run's restored ``test_accuracy`` entries): rows an evaluation wrote after the checkpoint it resumed
        from are written again by the resumed run, so they would repeat. Rewritten atomically; returns rows dropped."""
        path = self.eval_generations(rank)
        if not path.is_file():
            return 0
        keep = {(p["when"], p["step"]) for p in points}
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in lines if _evaluation_point(json.loads(line)) in keep]
        if len(kept) < len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)

    def read_eval_generations(self) -> list[dict]:
        """Every row of eval_generations.jsonl (rank 0's file and any other rank's), ``[]`` when absent."""
        rows = []
        for path in sorted(self.path.glob("eval_generations*.jsonl")):
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows

    def write_fingerprint(self, row: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.fingerprint.write_text(json.dumps(row, indent=2))

    # ---------------------------------------------------------------------------------------- readers
    def read_results(self) -> dict:
        """results.json as a dict; ``{}`` when absent, and with a warning when unreadable."""
        try:
            return json.loads(self.results.read_text(encoding="utf-8")) if self.results.is_file() else {}
        except (OSError, json.JSONDecodeError) as error:
            warnings.warn(f"unreadable {self.results}: {error}", stacklevel=2)
            return {}

    def read_emergence(self):
        """emergence.csv as a pandas frame (FileNotFoundError naming the path when absent)."""
        import pandas as pd

        if not self.emergence.is_file():
            raise FileNotFoundError(f"{self.emergence} not found: not a corrpo run folder, or the run never started")
        return pd.read_csv(self.emergence)

    def read_config(self) -> dict:
        """The resolved config.yaml as a dict; ``{}`` when absent."""
        import yaml

        return (yaml.safe_load(self.config.read_text(encoding="utf-8")) or {}) if self.config.is_file() else {}

    def test_accuracy(self, when: str) -> float:
        """The last ``when`` (start | sft_end | end) test accuracy in results.json; NaN when not recorded."""
        hits = [r for r in self.read_results().get("test_accuracy", []) if r.get("when") == when]
        return float(hits[-1]["accuracy"]) if hits else float("nan")


def _evaluation_point(row: dict) -> tuple:
    """The evaluation point of an eval_generations.jsonl row: (when, step)."""
    return row.get("when"), row.get("step")


def method_name(rl, rl_steps_run: int | None = None) -> str:
    """The method a run runs, as results.json records it: ``sft-only`` (no RL step: ``rl.steps`` is 0, or
    ``rl_steps_run``, the RL steps a finished run ran, is 0: it stopped before RL), ``corrpo`` (the inversion reward
    is on), ``top_entropy`` (80/20: only the top-entropy tokens train), else ``grpo``."""
    if (rl.steps if rl_steps_run is None else rl_steps_run) == 0:
        return SFT_ONLY
    if rl.inversion.coef > 0:
        return "corrpo"
    if rl.top_entropy_quantile < 1.0:
        return "top_entropy"
    return "grpo"


def find_runs(paths: Iterable[str | Path]) -> list[RunFolder]:
    """Each path that is a run folder as is; any other folder -> every run folder below it, sorted.

    So ``runs/tiny`` works as well as ``runs/tiny/<timestamp>``: the CLI puts each run in its own subfolder.
    """
    out: list[RunFolder] = []
    for path in map(Path, paths):
        if RunFolder(path).emergence.is_file():
            found = [RunFolder(path)]
        else:
            found = [RunFolder(p) for p in sorted({p.parent for p in path.glob("**/emergence.csv")})]
        if not found:
            warnings.warn(f"no emergence.csv in or below {path}", stacklevel=2)
        out.extend(run for run in found if run not in out)
    return out


def newest_finished_run(root: str | Path, exclude: Iterable[Path] = ()) -> RunFolder | None:
    """The newest run folder directly under ``root`` that holds results.json (a finished fit), ignoring ``exclude``."""
    root = Path(root)
    if not root.is_dir():
        return None
    excluded = {Path(p) for p in exclude}
    runs = [d for d in root.iterdir() if d.is_dir() and RunFolder(d).results.is_file() and d not in excluded]
    return RunFolder(max(runs, key=lambda d: d.name)) if runs else None  # timestamp names sort by time


def run_dir(trainer) -> Path:
    """A trainer's run folder (created if missing): ``trainer.default_root_dir``, which the CLI sets to the run's own
    folder (outside the CLI: the Trainer's ``default_root_dir``, Lightning's default being the working directory).

    Whatever the loggers (wandb, CSV, TensorBoard, several, none): a CSV or TensorBoard logger keeps its own files in
    its ``<name>/version_<n>/`` folder, and the run's files stay at the top beside ``checkpoints/``, where a resume
    finds them (``trainer.log_dir``, a CSV logger's version folder, would move them and add ``version_1/`` on
    resume)."""
    folder = Path(trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_folder(trainer) -> RunFolder:
    """:class:`RunFolder` of a trainer's run (see :func:`run_dir`)."""
    return RunFolder(run_dir(trainer))
