"""Evaluation: greedy accuracy, and pass@k / mean@k from ``k`` sampled completions per prompt, on the test split
and on the user's own eval files (GSM8K / MATH500 test sets as jsonl with prompt + answer).

``model.eval`` (:class:`EvalConfig`) says when (start, SFT end, end, and every ``every_n_steps`` train batches),
how (``k`` samples at ``temperature``; greedy) and on what (the test split, ``files``). Every evaluated completion
can be kept in ``<run>/eval_generations.jsonl`` (:meth:`corrpo.runs.run_folder.RunFolder.append_eval_generations`).

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code"): with
``n`` samples of which ``c`` are correct, ``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over prompts; mean@k is
the mean correct fraction of the ``k`` samples (= the unbiased pass@1). Correctness is
:func:`corrpo.rewards.accuracy.accuracy_reward` (math-verify); prompts whose gold cannot be parsed are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from corrpo.rewards.accuracy import accuracy_reward


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
