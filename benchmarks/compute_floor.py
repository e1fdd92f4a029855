"""The compute floor a benchmark row is measured against: FLOPs over the matmul rate measured in the same run.

A row's *floor fraction* is ``(flops / matmul_rate) / seconds``: 1.0 would mean the row ran as fast as dense fp32
matmuls at the model's own shapes allow; 0.1 means 90% of its time is spent elsewhere (dispatch, small ops,
memory traffic). The rate is measured here, best of several repeats, on ``[tokens, d_model] x [d_model, width]``
products of the model's widths, so it is the rate this machine reaches at these shapes now, under this load.

FLOP counts (multiply-adds count 2) of a decoder of ``L`` layers, width ``d``, MLP width ``m``, ``h`` query heads
and ``k`` KV heads of size ``e``, vocabulary ``V``:

- per token and layer, the linear maps: ``2 d (h e + 2 k e) + 2 h e d + 3 * 2 d m`` (q,k,v, o, gate/up/down);
- attention over ``c`` earlier positions: ``4 h e c`` (scores and the weighted sum);
- the unembedding of a position: ``2 d V``.

A forward's floor sums these over the tokens (causal: token ``t`` attends to ``t + 1`` positions); a training
step's is 3x its forward (the backward costs twice the forward).

W_k's exact nuclear norm has a second floor, not in FLOPs: one symmetric eigen-solve per scored token, of a Gram
matrix at least ``min(S, d_kv, d)``-square (``S`` keys seen: the rank bound of its ``d_kv x d`` gradient), which
LAPACK runs far below the matmul rate; :func:`timed_eigen_solves` times the ones a call really runs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def timed(fn, sync=None) -> tuple[float, object]:
    """The wall time of one call of ``fn`` and its result; ``sync`` (e.g. a CUDA synchronise) runs before each
    clock read. The one clock of :func:`best_of` and :func:`alternating_best`."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    out = fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0, out


def best_of(fn, repeats: int, sync=None) -> tuple[float, object]:
    """The best wall time of ``repeats`` calls of ``fn`` after one untimed warm-up call, and the last call's result;
    ``sync`` (e.g. a CUDA synchronise) runs before each clock read. Every benchmark's single-side timer."""
    fn()
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        seconds, out = timed(fn, sync)
        best = min(best, seconds)
    return best, out


def alternating_best(sides: dict, repeats: int, sync=None) -> dict[str, float]:
    """Each side's best wall time over ``repeats`` rounds, after one warm-up call each: the A/B timer.

    Unlike :func:`best_of` per side, the sides run in turn within each round (A, B, A, B, ...), so a drift of the
    machine (another process, clock boost, a warming cache) falls on both sides alike instead of on whichever ran
    second; their ratio is then the comparison."""
    for fn in sides.values():
        fn()
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(repeats):
        for name, fn in sides.items():
            best[name] = min(best[name], timed(fn, sync)[0])
    return best


def matmul_gflops(d_model: int, widths: list[int], tokens: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 GFLOP/s of ``[tokens, d_model] @ [d_model, w]`` over the model's ``widths``."""
    best = 0.0
    for width in widths:
        a, b = torch.randn(tokens, d_model), torch.randn(d_model, width)
        secs, _ = best_of(lambda a=a, b=b: a @ b, repeats)
        best = max(best, 2 * tokens * d_model * width / secs / 1e9)
    return best


def model_widths(config) -> list[int]:
    """The output widths of a decoder layer's matmuls (q, k/v, MLP): the shapes :func:`matmul_gflops` times."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return sorted({config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim,
                   config.intermediate_size, config.hidden_size})  # fmt: skip


def layer_flops_per_token(config) -> int:
    """FLOPs of one decoder layer's linear maps for one token (q,k,v,o + gate/up/down)."""
    d, m = config.hidden_size, config.intermediate_size
    h, k = config.num_attention_heads, config.num_key_value_heads
    e = getattr(config, "head_dim", None) or d // h
    return 2 * d * (h * e + 2 * k * e) + 2 * h * e * d + 3 * 2 * d * m


def forward_flops(config, rows: int, seq_len: int, unembedded: int | None = None, layers: int | None = None) -> int:
    """FLOPs of a causal forward of ``rows`` sequences of ``seq_len`` tokens through ``layers`` layers (all by
    default), with ``unembedded`` positions per row unembedded (all by default)."""
    n_layers = config.num_hidden_layers if layers is None else layers
    attention = attention_flops(config, seq_len)
    linear = layer_flops_per_token(config) * seq_len
    unembed = 2 * config.hidden_size * config.vocab_size * (seq_len if unembedded is None else unembedded)
    return rows * (n_layers * (linear + attention) + unembed)


def attention_flops(config, seq_len: int, causal: bool = True) -> int:
    """FLOPs of one layer's attention over a ``seq_len`` sequence: scores and weighted sum, ``4 h e`` per
    (query, key) pair; causal: token ``t`` attends to ``t + 1`` positions (``causal=False``: all of them)."""
    h = config.num_attention_heads
    e = getattr(config, "head_dim", None) or config.hidden_size // h
    pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    return 4 * h * e * pairs


def decode_flops(
    config, rows: int, prompt_len: int, new_tokens: int | list[int], prefill_rows: int | None = None
) -> int:
    """FLOPs of sampling ``new_tokens`` for ``rows`` sequences after a ``prompt_len`` prefill of ``prefill_rows``
    rows (default ``rows``; fewer when the samples of a prompt share its prefill), last position unembedded,
    plus one single-token forward per new token over its growing cache. ``new_tokens`` may be a list, one count
    per row: the work of a decoder that stops computing a row once it has finished."""
    h = config.num_attention_heads
    e = getattr(config, "head_dim", None) or config.hidden_size // h
    prefill = forward_flops(config, rows if prefill_rows is None else prefill_rows, prompt_len, unembedded=1)

    def row_flops(n: int) -> int:
        per_layer = sum(layer_flops_per_token(config) + 4 * h * e * (prompt_len + i + 1) for i in range(n))
        return config.num_hidden_layers * per_layer + 2 * config.hidden_size * config.vocab_size * n

    if isinstance(new_tokens, int):
        return prefill + rows * row_flops(new_tokens)
    if len(new_tokens) != rows:
        raise ValueError(f"{len(new_tokens)} per-row token counts for {rows} rows")
    return prefill + sum(row_flops(n) for n in new_tokens)


def floor_fraction(flops: float, gflops: float, seconds: float) -> float:
    """``(flops / rate) / seconds``: the share of ``seconds`` the FLOPs alone need at the measured matmul rate."""
    return flops / (gflops * 1e9) / seconds if seconds > 0 else float("nan")


@contextmanager
def timed_calls(classes: dict[str, list[tuple[object, str]]]):
    """Inside: the wall time of every call of each class of functions, ``classes = {name: [(owner, attribute),
    ...]}`` (``(torch, "bmm")``, ``(torch.Tensor, "exponential_")``), summed in ``spent[name]["seconds"]`` with the
    count in ``spent[name]["calls"]``; the attributes are restored on exit. A timed call made inside another timed
    call is not counted again (the outer one's time holds it). Wraps the functions the code looks up at call time,
    so the split is of the very calls a benchmark makes, at their real shapes, without a profiler's overhead on
    the small ops in between (a wrapper costs two clock reads a call)."""
    spent = {name: {"seconds": 0.0, "calls": 0} for name in classes}
    active = [False]  # inside a timed call: nested ones are part of it
    saved = []

    def timed(fn, record):
        def call(*args, **kwargs):
            if active[0]:
                return fn(*args, **kwargs)
            active[0] = True
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record["seconds"] += time.perf_counter() - start
                record["calls"] += 1
                active[0] = False

        return call

    try:
        for name, targets in classes.items():
            for owner, attribute in targets:
                fn = getattr(owner, attribute)
                saved.append((owner, attribute, attribute in vars(owner), fn))
                setattr(owner, attribute, timed(fn, spent[name]))
        yield spent
    finally:
        for owner, attribute, own, fn in reversed(saved):
            if own:
                setattr(owner, attribute, fn)
            else:  # inherited (a Tensor method): drop the shadowing wrapper
                delattr(owner, attribute)


EIGEN_SOLVERS = {"eigen": [(torch.linalg, "eigvalsh"), (torch.linalg, "eigh")]}
"""The solvers of K's and V's measures (:func:`timed_eigen_solves`)."""


@contextmanager
def timed_eigen_solves():
    """Inside: the wall time of every ``torch.linalg.eigvalsh`` / ``eigh`` call (the solvers of K's and V's
    measures), summed in ``spent["seconds"]`` with their count in ``spent["calls"]`` (:func:`timed_calls`). Timed
    on the real matrices: LAPACK's time depends on their spectra (the K Grams' rank-deficient spectra solve faster
    than random matrices of the same sizes), so no stand-in would be a floor."""
    with timed_calls(EIGEN_SOLVERS) as spent:
        yield spent["eigen"]


def eigen_seconds_of(fn, repeats: int) -> float:
    """The least eigen-solve time (:func:`timed_eigen_solves`) of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        with timed_eigen_solves() as spent:
            fn()
        best = min(best, spent["seconds"])
    return best
