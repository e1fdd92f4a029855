"""Wall time and exactness of the gradient-strength methods (loop | vmap | onepass) vs sequence length.

All methods score the SAME parameter set -- by default the last layer's q, v, o and MLP (gate/up/down)
weights; ``--projections q k v o mlp`` adds W_k, whose O(T^2 d) closed form costs more -- on one random
sequence of length T with every token scored. The loop is the reference. It costs one backward (and, for
the nuclear norm, one SVD per matrix) per token, so with
``--loop-max-tokens N`` it (and vmap) is run on N evenly spaced tokens only and its time is extrapolated
linearly per token to all T-1 tokens (marked ``*``); errors are then checked on that subset.

    python benchmarks/inversion_methods.py                 # CPU, ~4M-param 4-layer Qwen2, T in 64 256 1024
    python benchmarks/inversion_methods.py --gpu           # Qwen2-0.5B-shaped bf16 model on CUDA

The last line is ``RESULT onepass_speedup=<x> onepass_max_rel_err=<y>`` for T=256 (or the nearest T).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from corrpo.inversion.strength import StrengthConfig, logit_grad_strength  # noqa: E402
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


def timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` wall time (after one untimed warm-up when repeats > 1) and the last result."""
    if repeats > 1:
        fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_length(model, seq_len: int, args, device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen).to(device)
    attn = torch.ones_like(ids)
    full = torch.ones_like(ids, dtype=torch.bool)
    n_all = seq_len - 1
    subset = full.clone()
    n_sub = n_all
    if args.loop_max_tokens and args.loop_max_tokens < n_all:
        keep = torch.linspace(1, seq_len - 1, args.loop_max_tokens).round().long().unique()
        subset = torch.zeros_like(full)
        subset[0, keep.to(device)] = True
        n_sub = int(subset.sum())
    rows, ref = [], None
    for method in ("loop", "vmap", "onepass"):
        cfg = StrengthConfig(args.measure, projections=tuple(args.projections), method=method, chunk_size=args.chunk)
        mask = full if method == "onepass" else subset
        reps = 1 if method == "loop" else args.repeats
        secs, out = timed(lambda m=mask, c=cfg: logit_grad_strength(model, ids, attn, m, c), device, reps)
        scored = n_all if mask is full else n_sub
        extrapolated = scored < n_all
        total = secs * n_all / scored
        if method == "loop":
            ref = out
        err = max_relative_error(out[subset], ref[subset])
        rows.append(dict(method=method, T=seq_len, tokens=scored, secs=total, extrap=extrapolated, err=err))
    loop_secs = rows[0]["secs"]
    for row in rows:
        row["speedup"] = loop_secs / row["secs"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--gpu", action="store_true", help="Qwen2-0.5B-shaped bf16 model on CUDA")
    parser.add_argument("--loop-max-tokens", type=int, default=None, help="time loop/vmap on N tokens, extrapolate")
    parser.add_argument("--measure", default="nuclear", choices=["nuclear", "frobenius", "l1"])
    parser.add_argument("--projections", nargs="+", default=["q", "v", "o", "mlp"], help="add k to include W_k")
    parser.add_argument("--chunk", type=int, default=64, help="chunk_size for vmap / onepass k,v blocks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1: stable on a shared box)")
    args = parser.parse_args()
    if args.threads and not args.gpu:
        torch.set_num_threads(args.threads)
    if args.loop_max_tokens is None:
        args.loop_max_tokens = 128 if args.gpu else 96
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    device = torch.device("cuda" if args.gpu else "cpu")
    model = build_model(args.gpu)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"model: random Qwen2, {n_params / 1e6:.1f}M params, {model.config.num_hidden_layers} layers, "
        f"{next(model.parameters()).dtype}, {where}"
    )
    print(
        f"parameter set: last layer {args.projections}, measure={args.measure}; '*' = time extrapolated "
        f"per token from {args.loop_max_tokens} evenly spaced tokens (errors checked on those tokens)"
    )
    header = f"{'method':8} {'T':>5} {'tokens':>6} {'time_s':>10} {'vs_loop':>9} {'max_rel_err':>12}"
    print(header)
    print("-" * len(header))
    results = []
    for seq_len in args.lengths:
        for row in run_length(model, seq_len, args, device):
            results.append(row)
            star = "*" if row["extrap"] else " "
            print(
                f"{row['method']:8} {row['T']:>5} {row['tokens']:>6} {row['secs']:>9.3f}{star} "
                f"{row['speedup']:>8.1f}x {row['err']:>12.2e}"
            )
    target = min(args.lengths, key=lambda t: abs(t - 256))
    one = next(r for r in results if r["method"] == "onepass" and r["T"] == target)
    print(f"RESULT onepass_speedup={one['speedup']:.1f} onepass_max_rel_err={one['err']:.2e}")


if __name__ == "__main__":
    main()
