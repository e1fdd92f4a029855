"""Crash campaign: kill, signal, starve and corrupt a shrunk tiny run, resume it, compare with an uninterrupted run.

Each scenario runs the shrunk tiny config (3 SFT + 3 RL steps, CorR-PO term on so RL moves the weights, a
checkpoint every 2 steps) in a child process that a fault ends: SIGKILL at a step, inside a checkpoint write
(same filesystem, and the run folder on /dev/shm with ``$TMPDIR`` on disk), between the two saves of a step,
after the final save; a real full disk (a small tmpfs mounted over the run folder, when this is root; else
an emulated ENOSPC); SIGTERM and SIGINT; a zero-byte or truncated newest checkpoint; another run (another
config) finishing later in the same folder; a chain of kills. Then ``--ckpt_path last`` with the same command
finishes it, in this process, and the table says which checkpoint it resumed, the largest weight difference
against the uninterrupted run, whether emergence.csv is identical, and whether the files are intact (no
temp file left in the checkpoint folder or ``$TMPDIR``, every checkpoint left loads, config.yaml unchanged,
results.json written). Usage::

    python benchmarks/faults.py [--only NAME ...] [--keep DIR]

The last line is ``RESULT scenarios=<n> exact=<m> corrupt_chosen=<k> nan_exported=<j>``: exact counts scenarios whose
resumed run equals the uninterrupted one bit for bit (and whose child exited as its fault says it must);
corrupt_chosen counts resumes that picked a checkpoint the scenario had damaged (must be 0); nan_exported counts
scenarios whose run folder holds a checkpoint or an exported ``policy/`` with a NaN/inf tensor (must be 0). The
non-finite scenarios (``nan-*``: ``lr: .inf`` and ``rl.sampling.temperature: .nan`` in a YAML file, a NaN written
into one weight as the first RL step starts) resume nothing: they are exact when the child is refused or stops
with the error that names the cause, and nothing non-finite was written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]

from faults_continue import continuation_scenarios  # noqa: E402
from faults_export import export_scenarios, install_export_fault  # noqa: E402
from tiny_runs import TINY_FAST_ARGS  # noqa: E402

from corrpo.runs.run_folder import RunFolder  # noqa: E402

STEPS = ["--model.sft.steps=3", "--model.rl.steps=3", "--model.rl.inversion.coef=0.5", "--model.rl.lr=1e-3"]
OTHER_RUN = ["--model.rl.lr=5e-4"]  # a different experiment sharing the root
BIG = 64 * 1024  # a file this large in $TMPDIR is a checkpoint's orphan


def command(config: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), *TINY_FAST_ARGS, *STEPS, f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false", *extra]  # fmt: skip


def shrunk_config(folder: Path) -> Path:
    """configs/tiny.yaml with a checkpoint every 2 steps, so a crash has something to resume."""
    text = (REPO / "configs" / "tiny.yaml").read_text().replace("every_n_train_steps: 100", "every_n_train_steps: 2")
    path = folder / "faults.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ the child
def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(fault: str, at: int) -> None:
    """Patch this (child) process so that ``fault`` strikes at ``at``: the batch index (0-based) as that batch
    starts for ``kill-step``, ``sigterm``, ``sigint``, ``fill-disk``; the global step of the checkpoint being
    written for ``kill-write-*``, ``kill-between``, ``enospc`` (a checkpoint every 2 steps: 2, 4, 6)."""
    import torch

    from corrpo.module import CorrPOModule

    real_save, real_replace = torch.save, os.replace
    start_hook = CorrPOModule.on_train_batch_start

    def on_batch_start(self, batch, batch_idx):
        _STEP[0] = batch["step"]
        if fault == "slow" and batch["step"] >= 2:
            time.sleep(4.0)  # a long step: time for a second process to try the folder
        if batch["step"] == at:
            if fault == "nan-weight":  # after the batch's own start (the SFT policy export at the boundary)
                start_hook(self, batch, batch_idx)
                return poison_one_weight(self.policy)
            if fault == "kill-step":
                _kill_self()
            if fault in ("sigterm", "sigint"):
                os.kill(os.getpid(), signal.SIGTERM if fault == "sigterm" else signal.SIGINT)
            if fault == "fill-disk":  # leave half a checkpoint of space: the next save runs out mid-write
                root = Path(self.trainer.default_root_dir)
                size = max(p.stat().st_size for p in root.rglob("*.ckpt"))
                free = shutil.disk_usage(root).free
                with (root / "filler").open("wb") as handle:
                    handle.write(b"\0" * max(free - size // 2, 0))
        return start_hook(self, batch, batch_idx)

    def save(obj, f, *args, **kwargs):
        name = getattr(f, "name", str(f))
        step = obj.get("global_step") if isinstance(obj, dict) else None
        if step == at and ".partial-" in str(name):
            if fault == "kill-write-last" and ".last.ckpt" in str(name) or fault == "kill-write-first":
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                f.write(buffer.getvalue()[: buffer.tell() // 2])
                f.flush()
                os.fsync(f.fileno())
                _kill_self()
            if fault == "enospc":
                f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device (emulated)")
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if fault == "kill-between" and Path(dst).name == f"epoch=0-step={at}.ckpt":
            _kill_self()  # the step's first checkpoint is committed, its last.ckpt not yet

    def on_train_end(self):
        if fault == "kill-end":
            _kill_self()  # the final checkpoint is saved; results.json and policy/ are not written
        return end_hook(self)

    if fault == "hang-reward":
        install_hanging_reward(at)
    end_hook = CorrPOModule.on_train_end
    CorrPOModule.on_train_batch_start = on_batch_start
    CorrPOModule.on_train_end = on_train_end
    torch.save = save
    os.replace = replace


_STEP = [-1]  # the batch in flight in the child


def install_hanging_reward(at: int) -> None:
    """The rewards of batch ``at`` hang (after the process gets a SIGTERM, as a pre-empted job does): the step can
    only end by the grace period of ResumableCheckpoint (``stop_grace_s``, default 20 s)."""
    import corrpo.training.grpo as grpo

    real_score = grpo.score_completions

    def score(*args, **kwargs):
        if _STEP[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(600)
        return real_score(*args, **kwargs)

    grpo.score_completions = score


def child_main(args) -> None:
    install_fault(args.fault, args.at)
    install_export_fault(args.fault)  # benchmarks/faults_export.py's faults (enospc-export)
    from corrpo.cli import build_cli

    extra = ["--ckpt_path=last"] if args.resume else []
    build_cli(command(Path(args.config), Path(args.root), *args.extra, *extra))


# ----------------------------------------------------------------------------------------- the parent
@dataclass
class Outcome:
    name: str
    exits: list[int] = field(default_factory=list)
    resumed_from: str = "-"
    diff: float = float("nan")
    csv_same: bool = False
    intact: list[str] = field(default_factory=list)  # what is not intact; empty = intact
    exact: bool = False
    corrupt_chosen: bool = False
    evidence: str = "-"  # what shows the fault struck where it was aimed
    left: str = "-"  # the checkpoints the resume found: name=global step, or why it is broken
    nan_exported: bool = False  # a checkpoint or the exported policy/ holds a NaN/inf tensor


class Campaign:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = shrunk_config(work)
        self.reference_weights = None
        self.reference_csv = None

    def child(self, root: Path, tmpdir: Path, fault: str, at: int = -1, resume: bool = False, extra=()) -> int:
        argv = [sys.executable, __file__, "--child", "--config", str(self.config), "--root", str(root),
                "--fault", fault, "--at", str(at), *(["--resume"] if resume else [])]  # fmt: skip
        argv += [f"--extra={e}" for e in extra]
        env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
        # this process's wandb service: a child attached to it would leave its run "in use" there when killed,
        # which a real crash (the service dies with its process) does not
        env.pop("WANDB_SERVICE", None)
        done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
        if done.returncode not in (-9, 130, 143, 0) and "No space left on device" not in done.stderr:
            print(done.stderr[-3000:], file=sys.stderr)
        self.last_output = done.stdout + done.stderr
        return done.returncode

    def run_here(self, root: Path, tmpdir: Path, *extra: str):
        from corrpo.cli import build_cli

        os.environ["TMPDIR"] = str(tmpdir)
        tempfile.tempdir = None
        try:
            return build_cli(command(self.config, root, *extra))
        finally:
            os.environ.pop("TMPDIR")
            tempfile.tempdir = None

    def reference(self) -> None:
        cli = self.run_here(self.work / "reference", self.work / "tmp-ref")
        self.reference_weights = {k: v.clone() for k, v in cli.model.policy.state_dict().items()}
        self.reference_csv = RunFolder(cli.trainer.default_root_dir).emergence.read_text()

    def finish(self, out: Outcome, root: Path, tmpdir: Path, run: Path, config_bytes: bytes, corrupted=()) -> None:
        """Resume with ``--ckpt_path last`` here and fill in the comparison."""
        from corrpo.runs.resume import checkpoint_problem

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cli = self.run_here(root, tmpdir, "--ckpt_path=last")
        except Exception as err:  # noqa: BLE001 - a failed resume is a row of the table, not a crash of it
            out.intact.append(f"resume failed: {err!r:.80}")
            return
        chosen = Path(cli.config.fit.ckpt_path) if cli.config.fit.ckpt_path else None
        out.resumed_from = _short(chosen) if chosen else "fresh"
        out.corrupt_chosen = chosen is not None and chosen in {Path(p) for p in corrupted}
        weights = cli.model.policy.state_dict()
        out.diff = max((weights[k] - self.reference_weights[k]).abs().max().item() for k in weights)
        out.csv_same = RunFolder(run).emergence.read_text() == self.reference_csv
        if Path(cli.trainer.default_root_dir) != run:
            out.intact.append(f"resumed in {cli.trainer.default_root_dir}, not {run}")
        out.intact += [f"temp file {p.name}" for p in run.rglob("*.partial-*")]
        out.intact += [f"$TMPDIR orphan {p.name}" for p in tmpdir.rglob("*") if p.is_file() and p.stat().st_size > BIG]
        for ckpt in run.rglob("*.ckpt"):
            if ckpt not in corrupted and checkpoint_problem(ckpt) is not None:
                out.intact.append(f"{ckpt.name} {checkpoint_problem(ckpt)}")
        if RunFolder(run).config.read_bytes() != config_bytes:
            out.intact.append("config.yaml changed")
        if not RunFolder(run).results.is_file():
            out.intact.append("no results.json")
        out.exact = out.diff == 0.0 and out.csv_same and chosen is not None
        out.nan_exported = bool(non_finite_files(run))

    def scenario(self, name: str, faults: list[tuple[str, int]], expect: list[int], root_base: Path | None = None,
                 damage=None, tmp_base: Path | None = None) -> Outcome:  # fmt: skip
        """Children with ``faults`` in turn (each but the first resumes), ``damage`` to the files, then finish."""
        out = Outcome(name)
        root = (root_base or self.work) / name
        tmpdir = (tmp_base or self.work) / f"tmp-{name}"
        tmpdir.mkdir(parents=True)
        partial = []
        for i, (fault, at) in enumerate(faults):
            out.exits.append(self.child(root, tmpdir, fault, at, resume=i > 0))
            partial += [p.name for p in root.rglob("*.partial-*")]
        runs = [p for p in root.iterdir() if p.is_dir()]
        if len(runs) != 1:
            out.intact.append(f"{len(runs)} run folders")
            return out
        run = runs[0]
        if any(f.startswith("kill-write") for f, _ in faults):
            out.evidence = (
                f"half-written {_short(Path(partial[-1].split('.partial')[0][1:]))}" if partial else "NO temp"
            )
        elif faults[0][0] in ("fill-disk", "enospc"):
            in_save = "No space left on device" in self.last_output and "atomic_torch_save" in self.last_output
            out.evidence = "ENOSPC in a checkpoint save" if in_save else "NO ENOSPC in a save"
        elif faults[0][0] == "hang-reward":
            seen = "did not end within stop_grace_s" in self.last_output and "last step boundary" in self.last_output
            out.evidence = "grace period stopped the hung step" if seen else "NO grace stop"
        elif faults[0][0] in ("sigterm", "sigint"):
            out.evidence = "handler ran" if "saving a checkpoint" in self.last_output else "NO handler"
        config_bytes = RunFolder(run).config.read_bytes()
        corrupted = damage(run) if damage else []
        out.left = checkpoints_left(run)
        self.finish(out, root, tmpdir, run, config_bytes, corrupted)
        out.exact = out.exact and out.exits == expect and not out.evidence.startswith("NO")
        return out

    def wrong_run(self) -> Outcome:
        """Run A crashes; run B (another lr) finishes later in the same root; a third config is refused; A's
        command resumes A, not the newer B, and neither config.yaml changes."""
        from corrpo.runs.resume import ResumeError

        out = Outcome("wrong-run-resume")
        root, tmpdir = self.work / out.name, self.work / f"tmp-{out.name}"
        tmpdir.mkdir()
        out.exits.append(self.child(root, tmpdir, "kill-step", 5))
        (run_a,) = [p for p in root.iterdir() if p.is_dir()]
        time.sleep(1.1)  # B's folder gets its own timestamp
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_b = Path(self.run_here(root, tmpdir, *OTHER_RUN).trainer.default_root_dir)
        saved = {run: RunFolder(run).config.read_bytes() for run in (run_a, run_b)}
        out.left = f"A: {checkpoints_left(run_a)}; B: {checkpoints_left(run_b)}"
        try:
            self.run_here(root, tmpdir, "--model.rl.lr=3e-3", "--ckpt_path=last")
            out.intact.append("a third config was resumed")
        except ResumeError:
            out.evidence = "newer B skipped, C refused"
        if saved[run_b] != RunFolder(run_b).config.read_bytes():
            out.intact.append("run B's config.yaml changed")
        self.finish(out, root, tmpdir, run_a, saved[run_a])
        out.exact = out.exact and out.exits == [-9]
        return out

    def concurrent_second(self) -> Outcome:
        """A run A is training; a second process with A's command and ``--ckpt_path last`` is refused naming A's pid
        before it touches A's folder (it used to delete A's in-flight checkpoint temp file and kill A); A finishes
        and equals the uninterrupted run."""
        out = Outcome("concurrent-second-process")
        root, tmpdir = self.work / out.name, self.work / f"tmp-{out.name}"
        tmpdir.mkdir()
        env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
        env.pop("WANDB_SERVICE", None)
        argv = [sys.executable, __file__, "--child", "--config", str(self.config), "--root", str(root)]
        first = subprocess.Popen([*argv, "--fault", "slow"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, cwd=REPO)  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None and not list(root.glob("*/checkpoints/last.ckpt")):
            time.sleep(0.2)
        second = subprocess.run([*argv, "--fault", "none", "--resume"], env=env, capture_output=True, text=True,
                                cwd=REPO)  # fmt: skip
        running = first.poll() is None
        first_output = first.communicate()[0]
        out.exits = [first.returncode, second.returncode]
        refused = f"in use by pid {first.pid}" in second.stderr
        out.evidence = "second refused, naming pid" if refused and running else "NO refusal while A ran"
        if not refused:
            print(second.stderr[-2000:], first_output[-2000:], file=sys.stderr)
        runs = [p for p in root.iterdir() if p.is_dir()]
        if len(runs) != 1:
            out.intact.append(f"{len(runs)} run folders")
            return out
        run = runs[0]
        out.left = checkpoints_left(run)
        config_bytes = RunFolder(run).config.read_bytes()
        self.finish(out, root, tmpdir, run, config_bytes)
        out.exact = out.exact and out.exits == [0, 1] and not out.evidence.startswith("NO")
        return out


# ------------------------------------------------------------------------------- non-finite (issue 28, item 1)
NAN_SCENARIOS = {
    # name: (YAML laid over the command, fault, batch it strikes at, the child's exit, the words its error must say)
    "nan-lr-yaml": ("model:\n  sft:\n    lr: .inf\n", "none", -1, 2, "model.sft.lr must be a finite number"),
    "nan-temperature-yaml": (
        "model:\n  rl:\n    sampling:\n      temperature: .nan\n",
        "none",
        -1,
        2,
        "model.rl.sampling.temperature must be a finite number",
    ),
    "nan-weight-first-rl": (None, "nan-weight", 3, 1, "weights already hold NaN or inf"),  # batch 3: the first RL one
    # finite, but the step overflows fp32 (the path lr: .inf took): the check after the update stops the run
    "huge-lr-yaml": ("model:\n  sft:\n    lr: 1.0e+39\n", "none", -1, 1, "weight tensor(s) non-finite"),
}


def poison_one_weight(policy) -> None:
    """One NaN in the first decoder matrix (not the embedding: a NaN in an unused token's row changes nothing)."""
    import torch

    name, weight = next((n, p) for n, p in policy.named_parameters() if p.ndim == 2 and "embed" not in n)
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    print(f"[faults] NaN written into {name}[0, 0]", flush=True)


def non_finite_files(folder: Path) -> list[str]:
    """The checkpoints (their ``state_dict``) and exported weight files under ``folder`` that hold a NaN/inf."""
    import torch
    from safetensors.torch import load_file

    from corrpo.models.finite import nonfinite_tensors

    found = []
    for path in sorted(folder.rglob("*.ckpt")):
        try:  # files this campaign wrote (their hyper-parameters are dataclasses: not loadable weights-only)
            state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
        except Exception:  # noqa: BLE001 - damaged on purpose by a scenario: checkpoint_problem names it
            continue
        found += [str(path)] if nonfinite_tensors(state.items()) else []
    found += [str(p) for p in sorted(folder.rglob("*.safetensors")) if nonfinite_tensors(load_file(p).items())]
    return found


def nan_scenario(campaign: Campaign, name: str) -> Outcome:
    """A child that must be refused (a non-finite YAML value: exit 2) or stopped by the error naming the cause (a
    NaN weight, an update that overflows: exit 1), and whose folder holds nothing non-finite and no policy/."""
    overlay, fault, at, exit_code, says = NAN_SCENARIOS[name]
    out = Outcome(name)
    root, tmpdir = campaign.work / name, campaign.work / f"tmp-{name}"
    tmpdir.mkdir(parents=True)
    extra = []
    if overlay is not None:
        (campaign.work / f"{name}.yaml").write_text(overlay)
        extra.append(f"--config={campaign.work / f'{name}.yaml'}")
    out.exits.append(campaign.child(root, tmpdir, fault, at, extra=extra))
    out.evidence = f"error: {says}" if says in campaign.last_output else f"NO '{says}'"
    bad = non_finite_files(root) if root.exists() else []
    out.nan_exported = bool(bad)
    out.intact += [f"non-finite {Path(p).name}" for p in bad]
    runs = [p for p in root.iterdir() if p.is_dir()] if root.exists() else []
    out.left = "; ".join(checkpoints_left(run) or "none" for run in runs) or "no run folder"
    if any(RunFolder(run).policy.exists() for run in runs):
        out.intact.append("policy/ exported")
    out.exact = out.exits == [exit_code] and not out.evidence.startswith("NO") and not out.intact
    return out


def _short(path: Path) -> str:
    return path.name.removesuffix(".ckpt").replace("epoch=0-step=", "step")


def checkpoints_left(run: Path) -> str:
    """``last=4 step4=4`` (file=global step), ``last=0B`` for a broken one: what resume has to choose from."""
    import torch

    from corrpo.runs.resume import checkpoint_problem

    out = []
    for ckpt in sorted(run.rglob("*.ckpt")):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
            out.append(f"{_short(ckpt)}={step}")
        else:
            out.append(f"{_short(ckpt)}={'0B' if 'empty' in problem else 'cut'}")
    return " ".join(out)


def _zero_newest(run: Path) -> list[Path]:
    newest = max(run.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    newest.write_bytes(b"")
    return [newest]


def _truncate_newest_step_file(run: Path) -> list[Path]:
    """What a full disk left behind under Lightning's save: a truncated ``epoch=0-step=N.ckpt`` newer than an
    intact ``last.ckpt``."""
    (step_file,) = run.glob("checkpoints/epoch=*.ckpt")
    data = step_file.read_bytes()
    step_file.write_bytes(data[: len(data) // 2])
    later = time.time() + 5
    os.utime(step_file, (later, later))
    return [step_file]


def _free_space(run: Path) -> list[Path]:
    """After the full-disk crash: the user frees space (the filler), nothing was damaged on purpose."""
    (run / "filler").unlink(missing_ok=True)
    return []


@contextlib.contextmanager
def small_tmpfs(path: Path, size_mb: int):
    """A tmpfs of ``size_mb`` at ``path`` (a real full disk), or None when mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True
    ).returncode == 0  # fmt: skip
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def on_other_filesystem(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.stat(a).st_dev != os.stat(b).st_dev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--fault", help=argparse.SUPPRESS)
    parser.add_argument("--at", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these scenarios")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="corrpo-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    campaign = Campaign(work)
    if not args.only or set(args.only) - set(NAN_SCENARIOS):  # the nan-* scenarios compare with no reference
        campaign.reference()
    S = campaign.scenario
    plan = {
        "sigkill-mid-sft": lambda: S("sigkill-mid-sft", [("kill-step", 2)], [-9]),
        "sigkill-mid-rl": lambda: S("sigkill-mid-rl", [("kill-step", 5)], [-9]),
        "sigkill-in-write": lambda: S("sigkill-in-write", [("kill-write-last", 4)], [-9]),
        "sigkill-in-write-shm-run": lambda: S(
            "sigkill-in-write-shm-run",
            [("kill-write-first", 4)],
            [-9],
            root_base=shm / work.name if shm.is_dir() else None,
        ),  # fmt: skip
        "sigkill-between-saves": lambda: S("sigkill-between-saves", [("kill-between", 4)], [-9]),
        "sigkill-after-final-save": lambda: S("sigkill-after-final-save", [("kill-end", -1)], [-9]),
        "sigterm": lambda: S("sigterm", [("sigterm", 3)], [143]),
        "sigint": lambda: S("sigint", [("sigint", 3)], [130]),
        "zero-byte-newest": lambda: S("zero-byte-newest", [("kill-step", 5)], [-9], damage=_zero_newest),
        "truncated-newest": lambda: S("truncated-newest", [("kill-step", 5)], [-9], damage=_truncate_newest_step_file),
        "wrong-run-resume": campaign.wrong_run,
        **export_scenarios(campaign, Outcome, checkpoints_left),  # benchmarks/faults_export.py
        **continuation_scenarios(campaign, Outcome, checkpoints_left),  # benchmarks/faults_continue.py
        **{name: partial(nan_scenario, campaign, name) for name in NAN_SCENARIOS},
        "concurrent-second-process": campaign.concurrent_second,
        "hang-reward-sigterm": lambda: S("hang-reward-sigterm", [("hang-reward", 5)], [143]),
        "sigkill-chain": lambda: S(
            "sigkill-chain", [("kill-step", 2), ("kill-write-last", 4), ("kill-step", 5)], [-9, -9, -9]
        ),  # fmt: skip
    }
    notes = []
    if shm.is_dir() and on_other_filesystem(shm, Path(tempfile.gettempdir())):
        notes.append(f"sigkill-in-write-shm-run: run folder on {shm} (tmpfs), $TMPDIR on {work} (another filesystem)")
    outcomes = []
    names = args.only or [*plan, "disk-full"]
    for name in names:
        if name == "disk-full":
            with small_tmpfs(work / "small-disk", 48) as disk:
                if disk is not None:
                    notes.append(
                        "disk-full: the run folder on a real 48 MB tmpfs, filled as batch 4 starts to half a "
                        "checkpoint's free space: the save at global step 6 runs out mid-write"
                    )
                    out = S("disk-full", [("fill-disk", 4)], [1], root_base=disk, damage=_free_space)
                else:
                    notes.append("disk-full: emulated (ENOSPC raised mid-write; mounting a tmpfs needs root)")
                    out = S("disk-full", [("enospc", 4)], [1])
        else:
            out = plan[name]()
        outcomes.append(out)
        print(f"[faults] {out.name}: exits={out.exits} resumed_from={out.resumed_from} diff={out.diff:.3e} "
              f"intact={not out.intact} {out.intact}", flush=True)  # fmt: skip

    print(f"\nshrunk tiny config: {' '.join(STEPS)}, a checkpoint every 2 steps; resumed with --ckpt_path last")
    for note in notes:
        print(f"note: {note}")
    print("| scenario | child exit | fault seen | checkpoints left (file=step) | resumed from | max abs dw "
          "| emergence.csv same | files |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        intact = "intact" if not o.intact else "; ".join(o.intact)
        exits = " ".join(str(e) for e in o.exits)
        print(f"| {o.name} | {exits} | {o.evidence} | {o.left} | {o.resumed_from} | {o.diff:.1e} | {o.csv_same} "
              f"| {intact} |")  # fmt: skip
    exact = sum(o.exact and not o.intact for o in outcomes)
    corrupt = sum(o.corrupt_chosen for o in outcomes)
    nan_exported = sum(o.nan_exported for o in outcomes)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm / work.name, ignore_errors=True)
    print(f"RESULT scenarios={len(outcomes)} exact={exact} corrupt_chosen={corrupt} nan_exported={nan_exported}")


if __name__ == "__main__":
    main()
