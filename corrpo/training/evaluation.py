"""Evaluation: greedy accuracy, and pass@k / mean@k from ``k`` sampled completions per prompt, on the test split
and on the user's own eval files (GSM8K / MATH500 test sets as jsonl with prompt + answer).

``model.eval`` (:class:`EvalConfig`) says when (start, SFT end, end, and every ``every_n_steps`` train batches),
how (``k`` samples at ``temperature``; greedy) and on what (the test split, ``files``). Every evaluated completion
can be kept in ``<run>/eval_generations.jsonl`` (:meth:`corrpo.runs.run_folder.RunFolder.append_eval_generations`).

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code"): with
``n`` samples of which ``c`` are correct, ``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over prompts; mean@k is
the mean correct fraction of the ``k`` samples (= the unbiased pass@1). Correctness is
:func:`corrpo.rewards.accuracy.accuracy_reward` (math-verify); prompts whose gold cannot be parsed are left out.

:class:`Evaluator` runs the suite at one evaluation point (the test split, then each eval file) as plain code: it
decodes, scores, sums the counts over the ranks and hands back what to keep, log and save. The Lightning module
says when to evaluate and passes, through :class:`EvalContext`, how to generate, the ranks, where to log, the
progress bars; it keeps the results (checkpointed, results.json) and writes the generations through the run folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from corrpo.generation.rollout import Rollout, SamplingConfig
from corrpo.models.finite import require_finite_fields
from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.call import Prompt
from corrpo.training.collectives import SINGLE_PROCESS, Collectives
from corrpo.training.host import require_even_split
from corrpo.training.rng import restore_rng_states, rng_states


@dataclass
class EvalConfig:
    """``model.eval``: periodic evaluation, pass@k / mean@k at a temperature, the user's eval files."""

    every_n_steps: int = 0
    """Also evaluate every this many train batches (besides start, SFT end and end); 0 = those three only."""
    k: int = 0
    """Completions sampled per prompt for pass@k and mean@k (pass@1, 2, 4, ... up to k are reported); 0 = none."""
    temperature: float = 1.0
    """Sampling temperature of the ``k`` completions."""
    top_p: float = 1.0
    """Nucleus sampling mass of the ``k`` completions."""
    greedy: bool = True
    """Greedy accuracy on the eval files too (on the test split it is always measured: results.json test_accuracy)."""
    files: list[str] = field(default_factory=list)
    """Eval sets of your own: jsonl/json/parquet files with prompt + answer (or Hugging Face datasets), read by the
    records loader with ``data.rl_fields``; each is logged as ``eval/<file stem>/*``."""
    max_records: int | None = None
    """Records of each eval file used (its first ones); None = all."""
    save_generations: bool = True
    """Write every evaluated completion (prompt, gold answer, completion, correct) to eval_generations.jsonl."""

    def __post_init__(self) -> None:
        require_finite_fields(self, "eval")
        if self.every_n_steps < 0 or self.k < 0:
            raise ValueError(f"eval.every_n_steps and eval.k must be >= 0, got {self.every_n_steps}, {self.k}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"eval.temperature must be > 0 and eval.top_p in (0, 1], got {self.temperature}, {self.top_p}"
            )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)`` (1 when ``n - c < k``)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def reported_ks(k: int) -> list[int]:
    """The ``k`` of the reported pass@k: 1, 2, 4, ... below ``k``, and ``k`` itself."""
    out, j = [], 1
    while j < k:
        out.append(j)
        j *= 2
    return [*out, k] if k else []


def sample_metrics(correct: Sequence[Sequence[float]], k: int) -> dict[str, float]:
    """Sums over prompts (divide by ``scored`` for the means; sums so that ranks can add them): ``pass@j`` for
    :func:`reported_ks`, ``mean@k``, and ``scored``. ``correct[i]`` is prompt i's ``k`` scores (0/1)."""
    out = {f"pass@{j}": 0.0 for j in reported_ks(k)}
    out[f"mean@{k}"] = 0.0
    for scores in correct:
        c = int(round(sum(scores)))
        for j in reported_ks(k):
            out[f"pass@{j}"] += pass_at_k(len(scores), c, j)
        out[f"mean@{k}"] += c / len(scores)
    out["scored"] = float(len(correct))
    return out


def generate_and_score(
    generate: Callable[..., list[str]],
    records: list[dict],
    n: int,
    batch_size: int,
    greedy: bool,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[float]], list[dict]]:
    """``n`` completions per record from ``generate(prompts, n, greedy) -> texts`` (prompt-major), scored with
    math-verify: per scorable record its ``n`` scores, and one row per completion (unscorable ones included, with
    ``correct`` None); ``progress(records done)`` after each call."""
    correct, rows = [], []
    per_call = max(1, batch_size // max(n, 1))
    for start in range(0, len(records), per_call):
        chunk = records[start : start + per_call]
        texts = generate([r["prompt"] for r in chunk], n, greedy)
        prompts = [r["prompt"] for r in chunk for _ in range(n)]
        answers = [r["answer"] for r in chunk for _ in range(n)]
        values = accuracy_reward(prompts, texts, answer=answers)
        for i, record in enumerate(chunk):
            scores = values[i * n : (i + 1) * n]
            if all(v is not None for v in scores):
                correct.append([float(v) for v in scores])
            for j, (text, value) in enumerate(zip(texts[i * n : (i + 1) * n], scores, strict=True)):
                rows.append({"prompt": record["prompt"], "answer": record["answer"], "sample": j, "completion": text,
                             "correct": value})  # fmt: skip
        if progress is not None:
            progress(len(chunk))
    return correct, rows


def eval_set_name(source: str) -> str:
    """The name an eval file is logged under: its stem (``data/math500.jsonl`` -> ``math500``)."""
    stem = Path(source).stem if Path(source).suffix else source
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) or "eval"


@contextmanager
def no_progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """No bar: what :class:`EvalContext` shows outside a Trainer (``advance(n)`` does nothing)."""
    yield lambda n: None


@dataclass
class EvalContext:
    """What an evaluation acts on, as of now: the device, the ranks and the loggers change as a Trainer attaches."""

    generate: Callable[..., Rollout]
    """``generate(prompts, n, greedy=..., sampling=...)``: ``n`` completions per prompt, prompt-major."""
    decode: Callable[[Rollout], list[str]]
    """Completion texts of a rollout (special tokens dropped)."""
    sampling: SamplingConfig
    """The RL sampling settings; the ``k`` samples take ``model.eval``'s temperature and top-p instead."""
    batch_size: int
    """Prompts per greedy generate call (``model.eval_batch_size``; ``batch_size // k`` when sampling ``k``)."""
    collectives: Collectives = SINGLE_PROCESS
    device: torch.device | str = "cpu"
    """Where the cross-rank sums are reduced."""
    sharded: bool = False
    """FSDP2: every forward is a collective, so every rank must decode the same number of prompts."""
    log: Callable[[dict[str, float]], None] = lambda metrics: None
    """Send metrics to every logger at the current step."""
    progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]] = no_progress
    """``progress(description, total)``: a bar while a block runs, yielding ``advance(n)``."""


@dataclass
class SplitAccuracy:
    """The test split's greedy accuracy at one evaluation point, summed over the ranks."""

    entry: dict
    """``{when, step, accuracy, scored}``: one entry of results.json ``test_accuracy``."""
    shard: list[dict]
    """This rank's test records (the suite samples pass@k on them)."""
    generations: list[dict]
    """One row per greedy completion of this rank."""

    @property
    def accuracy(self) -> float:
        return self.entry["accuracy"]


class Evaluator:
    """The ``model.eval`` suite of one run: greedy accuracy, pass@k / mean@k, the eval files.

    Args:
        config: ``model.eval``.
        context: returns the :class:`EvalContext` of now (called at each use: the module moves, the Trainer
            attaches).
    """

    def __init__(self, config: EvalConfig, context: Callable[[], EvalContext]) -> None:
        self.config = config
        self.context = context
        self._sets: dict[str, list[dict]] | None = None

    def texts(self, prompts: list[Prompt], n: int, greedy: bool) -> list[str]:
        """``n`` completions per prompt (text or message lists; prompt-major): greedy, or sampled at
        ``eval.temperature`` / ``eval.top_p``."""
        ctx, cfg = self.context(), self.config
        sampling = None if greedy else replace(ctx.sampling, temperature=cfg.temperature, top_p=cfg.top_p)
        return ctx.decode(ctx.generate(prompts, n, greedy=greedy, sampling=sampling))

    @torch.no_grad()
    def accuracy_counts(self, records: list[dict], rows: list | None = None, progress=None) -> tuple[float, int]:
        """Greedy decoding, math-verify: ``(correct, scored)`` over held-out prompts; unscorable golds are
        left out of both. ``rows`` (a list) receives one row per completion."""
        batch_size = self.context().batch_size
        correct, generated = generate_and_score(self.texts, records, 1, batch_size, True, progress)
        if rows is not None:
            rows.extend(generated)
        return float(sum(c[0] for c in correct)), len(correct)

    def test_accuracy(self, records: list[dict]) -> float:
        """Greedy-decoding accuracy (math-verify) on held-out prompts; unscorable golds are excluded."""
        correct, scored = self.accuracy_counts(records)
        return correct / max(scored, 1)

    def test_split(self, when: str, step: int, records: list[dict]) -> SplitAccuracy:
        """Greedy accuracy on the test split: each rank decodes every ``world_size``-th record and the counts are
        summed across ranks, so the test set is decoded once in all, not once per rank."""
        ctx = self.context()
        self._check_even_split(ctx, "data.n_test", len(records))
        shard = records[ctx.collectives.rank :: ctx.collectives.world_size]
        rows: list[dict] = []
        with ctx.progress(f"eval {when}: test", len(shard)) as advance:
            correct, scored = ctx.collectives.sum_floats(*self.accuracy_counts(shard, rows, advance), device=ctx.device)
        accuracy = correct / max(scored, 1)
        entry = {"when": when, "step": step, "accuracy": accuracy, "scored": int(scored)}
        return SplitAccuracy(entry, shard, [{**row, "split": "test", "mode": "greedy"} for row in rows])

    def eval_sets(self, load: Callable[[str], list[dict]]) -> dict[str, list[dict]]:
        """``model.eval.files`` read once by ``load(source)`` (their first ``max_records``), this rank's share of
        each, by :func:`eval_set_name`."""
        if self._sets is None:
            ctx = self.context()
            self._sets = {}
            for source in self.config.files:
                records = load(source)[: self.config.max_records]
                self._check_even_split(ctx, f"model.eval.files ({source}: records)", len(records))
                self._sets[eval_set_name(source)] = records[ctx.collectives.rank :: ctx.collectives.world_size]
        return self._sets

    def suite(self, when: str, step: int, test: SplitAccuracy, sets: dict[str, list[dict]]) -> tuple[list[dict], list]:
        """pass@k / mean@k on the test split, greedy and pass@k on each eval set, each set's figures logged as
        ``eval/<set>/<key>``: ``(entries, generations)``, the entries for results.json ``eval`` and every
        completion (the test split's greedy ones first) stamped with ``when`` and ``step``."""
        ctx, cfg = self.context(), self.config
        entries, generations = [], list(test.generations)
        for name, records in [("test", test.shard), *sets.items()]:
            entry: dict = {"when": when, "step": step, "split": name}
            if name == "test":
                entry["greedy_accuracy"] = test.accuracy
            elif cfg.greedy:
                rows: list[dict] = []
                with ctx.progress(f"eval {when}: {name} greedy", len(records)) as advance:
                    counts = self.accuracy_counts(records, rows, advance)
                counts = ctx.collectives.sum_floats(*counts, device=ctx.device)
                entry["greedy_accuracy"] = counts[0] / max(counts[1], 1)
                generations += [{**row, "split": name, "mode": "greedy"} for row in rows]
            if cfg.k:
                generations += self._sampled(ctx, when, name, records, entry)
            if len(entry) > 3:
                entries.append(entry)
                skip = ("when", "step", "split", "scored", "greedy_accuracy" if name == "test" else "")
                metrics = {f"eval/{name}/{key}": value for key, value in entry.items() if key not in skip}
                if metrics:  # the test split's greedy accuracy is eval/test_accuracy already
                    ctx.log(metrics)
        return entries, [{"when": when, "step": step, **row} for row in generations]

    def _sampled(self, ctx: EvalContext, when: str, name: str, records: list[dict], entry: dict) -> list[dict]:
        """pass@j / mean@k of ``k`` samples per record into ``entry``; the sampled rows. Sampled on a copy of the
        RNG streams: turning eval@k on does not change the training run."""
        cfg = self.config
        states = rng_states()
        with ctx.progress(f"eval {when}: {name} pass@{cfg.k}", len(records)) as advance:
            with torch.no_grad():
                correct, rows = generate_and_score(self.texts, records, cfg.k, ctx.batch_size, False, advance)
        restore_rng_states(states)
        sums = sample_metrics(correct, cfg.k)
        totals = ctx.collectives.sum_floats(*sums.values(), device=ctx.device)
        scored = max(totals[-1], 1)
        entry.update({key: total / scored for key, total in zip(sums, totals[:-1], strict=False)})
        entry["scored"] = int(totals[-1])
        return [{**row, "split": name, "mode": f"T={cfg.temperature}"} for row in rows]

    @staticmethod
    def _check_even_split(ctx: EvalContext, key: str, n: int) -> None:
        """Under FSDP2 every rank must make the same generate calls (each forward is a collective)."""
        if ctx.sharded:
            why = "under FSDP2: every rank must decode the same number of prompts"
            require_even_split(key, n, ctx.collectives.world_size, why)
