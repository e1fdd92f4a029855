"""Wall time and exactness of the gradient-strength methods (loop | vmap | onepass | sketch) vs sequence length.

All methods score the SAME parameter set -- by default the last layer's q, v, o and MLP (gate/up/down)
weights; ``--projections q k v o mlp`` adds W_k, whose O(T^2 d) closed form costs more -- on ``--batch``
random sequences (default 1) of length T with every token scored. The loop is the reference. It costs one
backward (and, for the nuclear norm, one SVD per matrix) per token, so with ``--loop-max-tokens N`` it (and
vmap) is run on N evenly spaced tokens only and its time is extrapolated linearly per token to all
``batch * (T - 1)`` tokens (marked ``*``); errors are then checked on that subset. ``sketch`` costs
``sketch_dim`` batched JVPs per matrix whatever the token count, so it gains with ``--batch``. Every method,
the loop included, is timed best of ``--repeats`` after one untimed warm-up, so one load spike cannot move a
ratio; the ``floor`` column is each row's compute-floor fraction (``benchmarks/compute_floor.py``).

    python benchmarks/inversion_methods.py                 # CPU, ~4M-param 4-layer Qwen2, T in 64 256 1024
    python benchmarks/inversion_methods.py --gpu           # Qwen2-0.5B-shaped bf16 model on CUDA
    python benchmarks/inversion_methods.py --measure frobenius --layers all --methods loop vmap sketch

``sketch`` (frobenius only) is an estimate, not exact: its rows also show the median relative error and the
inversion it gives, ``spearman`` = Spearman(entropy, strength) over the checked tokens, next to the loop's.

With W_k, the nuclear norm and onepass (CPU), each length also prints K's floor: the fp64 eigen-solves onepass
runs (one per token, at least ``min(S, d_kv, d)``-square: the rank bound of W_k's gradient;
``compute_floor.timed_eigen_solves``, timed on its own matrices), plus one no-grad forward of the batch;
``loop / floor`` (``ceiling``) is the most a onepass that solves those eigenproblems with LAPACK can reach on this
machine, were all its other work free.

The last line is ``RESULT onepass_speedup=<x> onepass_max_rel_err=<y>`` (plus ``onepass_ceiling=<z>`` with K's
floor) for T=256 (or the nearest T); without
onepass in ``--methods``, ``RESULT sketch_speedup=<x> sketch_median_rel_err=<y> sketch_spearman_gap=<z>``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from compute_floor import (  # noqa: E402
    best_of,
    eigen_seconds_of,
    floor_fraction,
    forward_flops,
    matmul_gflops,
    model_widths,
)
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from corrpo.inversion.correlation import batched_spearman  # noqa: E402
from corrpo.inversion.strength import StrengthConfig, score_tokens  # noqa: E402
from corrpo.inversion.strength_common import max_relative_error  # noqa: E402

CPU_SHAPE = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
GPU_SHAPE = dict(  # Qwen2-0.5B
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def build_model(gpu: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = GPU_SHAPE if gpu else CPU_SHAPE
    cfg = Qwen2Config(**shape, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg)
    if gpu:
        model = model.to(device="cuda", dtype=torch.bfloat16)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def strength_config(args, method: str) -> StrengthConfig:
    """The benchmark's parameter set and measure, scored by ``method``."""
    return StrengthConfig(
        args.measure, layers=args.layers, projections=tuple(args.projections), method=method,
        chunk_size=args.chunk, sketch_dim=args.sketch_dim,
    )  # fmt: skip


def run_length(model, seq_len: int, args, device: torch.device) -> tuple[list[dict], dict | None]:
    """Every method's row at length ``seq_len``, and K's floor there (None unless W_k, nuclear, onepass, CPU)."""
    gen = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, seq_len), generator=gen).to(device)
    attn = torch.ones_like(ids)
    full = torch.ones_like(ids, dtype=torch.bool)
    full[:, 0] = False  # nothing predicts the first token
    n_all = int(full.sum())
    subset = full.clone()
    n_sub = n_all
    if args.loop_max_tokens and args.loop_max_tokens < n_all:
        flat = full.flatten().nonzero().squeeze(1)
        keep = flat[torch.linspace(0, n_all - 1, args.loop_max_tokens).round().long().unique().to(flat.device)]
        subset = torch.zeros_like(full).flatten()
        subset[keep] = True
        subset = subset.view_as(full)
        n_sub = int(subset.sum())
    rows, ref = [], None
    for method in args.methods:
        cfg = strength_config(args, method)
        mask = subset if method in ("loop", "vmap") else full
        reps = args.repeats  # every method: one untimed warm-up, then best of ``repeats``
        secs, (entropy, out) = best_of(
            lambda m=mask, c=cfg: score_tokens(model, ids, attn, m, c), reps, lambda: _sync(device)
        )
        scored = n_all if mask is full else n_sub
        extrapolated = scored < n_all
        total = secs * n_all / scored
        if method == "loop":
            ref = out
        checked = subset & torch.isfinite(ref)
        relative = ((out[checked] - ref[checked]) / ref[checked]).abs()
        rows.append(
            dict(
                method=method, T=seq_len, tokens=scored, secs=total, extrap=extrapolated,
                err=max_relative_error(out[subset], ref[subset]), median_err=relative.median().item(),
                spearman=batched_spearman(entropy[checked], out[checked]).item(),
            )
        )  # fmt: skip
    loop_secs = rows[0]["secs"]
    flops = scoring_flops(model.config, args.batch, seq_len, args.projections)
    k_floor = None
    if "k" in args.projections and args.measure == "nuclear" and "onepass" in args.methods and device.type == "cpu":
        # the eigen-solves a onepass call runs (one per token, at least min(S, d_kv, d)-square for W_k), timed on
        # its own matrices, best of the repeats; plus the forward onepass rides on: what no exact onepass avoids
        cfg = strength_config(args, "onepass")
        eigen = eigen_seconds_of(lambda: score_tokens(model, ids, attn, full, cfg), args.repeats)
        with torch.no_grad():
            forward, _ = best_of(lambda: model(input_ids=ids, attention_mask=attn, use_cache=False), args.repeats)
        k_floor = dict(eigen=eigen, forward=forward, ceiling=loop_secs / (eigen + forward))
    for row in rows:
        row["speedup"] = loop_secs / row["secs"]
        row["floor"] = floor_fraction(flops, args.gflops, row["secs"])
    return rows, k_floor


def scoring_flops(config, rows: int, seq_len: int, projections: list[str]) -> float:
    """The floor every method is held to: one forward of the batch (every position unembedded: the entropy), the
    last layer's backward (2x its forward), and the closed-form products W_k's and W_v's strengths cannot avoid:
    per scored token at position t, ``2 (t+1) d_kv d`` for K's matrix and ``2 d_kv^2 d`` for its Gram (nuclear),
    ``2 (t+1) d`` per head for V's context."""
    d = config.hidden_size
    d_kv = config.num_key_value_heads * (d // config.num_attention_heads)
    flops = forward_flops(config, rows, seq_len) + 2 * forward_flops(config, rows, seq_len, unembedded=0, layers=1)
    positions = sum(t + 1 for t in range(seq_len - 1))
    if "k" in projections:
        flops += rows * (2 * positions * d_kv * d + (seq_len - 1) * 2 * d_kv * d_kv * d)
    if "v" in projections:
        flops += rows * 2 * positions * d * config.num_attention_heads
    return float(flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--gpu", action="store_true", help="Qwen2-0.5B-shaped bf16 model on CUDA")
    parser.add_argument("--loop-max-tokens", type=int, default=None, help="time loop/vmap on N tokens, extrapolate")
    parser.add_argument("--measure", default="nuclear", choices=["nuclear", "frobenius", "l1"])
    parser.add_argument("--layers", default="last", choices=["last", "all"], help="all: not with onepass")
    parser.add_argument("--methods", nargs="+", default=["loop", "vmap", "onepass"], help="loop first (reference)")
    parser.add_argument("--sketch-dim", type=int, default=32, help="random directions per matrix for sketch")
    parser.add_argument("--batch", type=int, default=1, help="sequences scored per call (a probe batch)")
    parser.add_argument("--projections", nargs="+", default=["q", "v", "o", "mlp"], help="add k to include W_k")
    parser.add_argument("--chunk", type=int, default=64, help="chunk_size: vmap tokens, onepass blocks, sketch dirs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: stable on a shared box)")
    args = parser.parse_args()
    if args.methods[0] != "loop":
        parser.error("--methods must start with loop: it is the reference every row is compared with")
    if args.threads and not args.gpu:
        torch.set_num_threads(args.threads)
    if args.loop_max_tokens is None:
        args.loop_max_tokens = 128 if args.gpu else 96
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    device = torch.device("cuda" if args.gpu else "cpu")
    model = build_model(args.gpu)
    n_params = sum(p.numel() for p in model.parameters())
    args.gflops = matmul_gflops(model.config.hidden_size, model_widths(model.config)) if not args.gpu else float("nan")
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model: random Qwen2, {n_params / 1e6:.1f}M params, {model.config.num_hidden_layers} layers, "
        f"{next(model.parameters()).dtype}, {where}"
    )
    print(
        f"{args.batch} sequence(s) per call; parameter set: {args.layers} layer(s) {args.projections}, "
        f"measure={args.measure}; '*' = time extrapolated "
        f"per token from {args.loop_max_tokens} evenly spaced tokens (errors checked on those tokens)"
    )
    header = (
        f"{'method':8} {'T':>5} {'tokens':>6} {'time_s':>10} {'vs_loop':>9} {'max_rel_err':>12} {'med_rel_err':>12} "
        f"{'spearman':>9} {'floor':>6}"
    )
    print(
        f"floor = the row's FLOPs (one forward + the last layer's backward + K/V closed forms) over the matmul "
        f"rate measured now, {args.gflops:.0f} GFLOP/s, as a fraction of its time (1.0 = matmul-bound)"
    )
    print(header)
    print("-" * len(header))
    results, k_floors = [], {}
    for seq_len in args.lengths:
        rows, k_floors[seq_len] = run_length(model, seq_len, args, device)
        for row in rows:
            results.append(row)
            star = "*" if row["extrap"] else " "
            print(
                f"{row['method']:8} {row['T']:>5} {row['tokens']:>6} {row['secs']:>9.3f}{star} "
                f"{row['speedup']:>8.1f}x {row['err']:>12.2e} {row['median_err']:>12.2e} {row['spearman']:>9.4f} "
                f"{row['floor']:>6.3f}"
            )
        if (k := k_floors[seq_len]) is not None:
            print(
                f"  K floor at T={seq_len}: eigen-solves {k['eigen']:.3f} s + one forward {k['forward']:.3f} s; "
                f"loop / floor = {k['ceiling']:.1f}x, the ceiling were all other work free"
            )
    target = min(args.lengths, key=lambda t: abs(t - 256))
    at = {r["method"]: r for r in results if r["T"] == target}
    if "onepass" in at:
        k = k_floors[target]
        ceiling = f" onepass_ceiling={k['ceiling']:.1f}" if k else ""
        print(
            f"RESULT onepass_speedup={at['onepass']['speedup']:.1f} onepass_max_rel_err={at['onepass']['err']:.2e}"
            + ceiling
        )
    elif "sketch" in at:
        gap = abs(at["sketch"]["spearman"] - at["loop"]["spearman"])
        print(
            f"RESULT sketch_speedup={at['sketch']['speedup']:.1f} "
            f"sketch_median_rel_err={at['sketch']['median_err']:.2e} sketch_spearman_gap={gap:.4f}"
        )


if __name__ == "__main__":
    main()
