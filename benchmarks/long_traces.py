"""Onepass strengths on long reasoning traces: time against one forward+backward, growth with T, memory, exactness.

For each length T, one random sequence of T tokens (every token scored), the model of ``--shape``:

* ``fwdbwd_s``: one forward + backward of the whole model (cross-entropy on every position): what a training
  step of that batch costs, the yardstick;
* ``qvo_s`` / ``qkvo_s``: ``onepass`` strengths of the last layer's q,v,o (the reward term's default) and q,k,v,o
  (the tracker's), nuclear norm, best of ``--repeats``; ``x_fb`` = that time over ``fwdbwd_s``;
* ``floor``: the row's FLOPs (``inversion_methods.scoring_flops``: forward, last-layer backward, K's ``M_t`` and V's
  contexts) over the matmul rate measured now, as a fraction of its time (1.0 = matmul-bound);
* ``growth``: the time's ratio to the previous length's (attention's ``T^2`` gives 4.0 per doubling);
* ``peak_MB``: the call's peak resident memory above the process's before it (sampled every 2 ms), for
  forward+backward and for q,k,v,o onepass;
* ``max_rel_err``: per-token relative error of q,k,v,o onepass against the ``loop`` reference on ``--loop-tokens``
  evenly spaced tokens.

    python benchmarks/long_traces.py                       # 4M Qwen2 (hidden 256), T = 512 .. 8192
    python benchmarks/long_traces.py --shape 0.5b --lengths 512 1024 2048

The last line is ``RESULT qkvo_over_fwdbwd_4k=<x> growth_2k_4k=<y> max_rel_err=<z>`` (4k, 2k: the lengths nearest
4096 and 2048 measured). The load average is printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from compute_floor import best_of, floor_fraction, forward_flops, matmul_gflops, model_widths  # noqa: E402
from inversion_methods import CPU_SHAPE, GPU_SHAPE, scoring_flops  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402

from corrpo.inversion.strength import StrengthConfig, logit_grad_strength  # noqa: E402
from corrpo.inversion.strength_common import max_relative_error  # noqa: E402

SHAPES = {"4m": CPU_SHAPE, "0.5b": GPU_SHAPE}


def build(shape: str, max_len: int, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=max(max_len, 4096))
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).to(device).eval()


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then read low
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_above(fn, cuda: bool = False) -> tuple[float, object]:
    """``fn()``'s result and its peak memory in MB above the memory before it: CUDA's peak allocation, or the
    resident set sampled every 2 ms on the CPU (after ``malloc_trim``)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, out
    gc.collect()
    _trim()  # hand the heap's free memory back, so the resident set rises with what the call allocates
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], _rss()) - base) / 2**20, out


def fwd_bwd(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
    model.zero_grad(set_to_none=True)


def run_length(model, T: int, args, sync) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
    scored = torch.ones_like(ids, dtype=torch.bool)
    row: dict = {"T": T}
    row["fwdbwd_s"], _ = best_of(lambda: fwd_bwd(model, ids), args.repeats, sync)
    row["fwdbwd_MB"], _ = peak_above(lambda: fwd_bwd(model, ids), device.type == "cuda")
    values = {}
    for name, projections in (("qvo", ["q", "v", "o"]), ("qkvo", ["q", "k", "v", "o"])):
        cfg = StrengthConfig(projections=projections, method="onepass", chunk_size=args.chunk, k_solver=args.k_solver)
        row[f"{name}_s"], values[name] = best_of(lambda c=cfg: logit_grad_strength(model, ids, None, scored, c),
                                                 args.repeats, sync)  # fmt: skip
        row[f"{name}_x_fb"] = row[f"{name}_s"] / row["fwdbwd_s"]
        flops = scoring_flops(model.config, 1, T, projections)
        row[f"{name}_floor"] = floor_fraction(flops, args.gflops, row[f"{name}_s"])
    cfg = StrengthConfig(projections=["q", "k", "v", "o"], method="onepass", chunk_size=args.chunk,
                         k_solver=args.k_solver)  # fmt: skip
    row["qkvo_MB"], _ = peak_above(lambda: logit_grad_strength(model, ids, None, scored, cfg), device.type == "cuda")
    row["fwdbwd_floor"] = floor_fraction(3 * forward_flops(model.config, 1, T), args.gflops, row["fwdbwd_s"])
    subset = torch.zeros_like(scored)
    subset[0, torch.linspace(1, T - 1, args.loop_tokens).round().long().unique()] = True
    loop = logit_grad_strength(
        model, ids, None, subset, StrengthConfig(projections=["q", "k", "v", "o"], method="loop")
    )
    row["max_rel_err"] = max_relative_error(values["qkvo"][subset], loop[subset])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="4m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timed calls after one warm-up")
    parser.add_argument("--loop-tokens", type=int, default=6, help="tokens checked against the loop reference")
    parser.add_argument("--chunk", type=int, default=64, help="strength.chunk_size")
    parser.add_argument("--k-solver", default="auto", choices=["auto", "eigh", "batched"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    model = build(args.shape, max(args.lengths), args.device)
    args.gflops = matmul_gflops(model.config.hidden_size, model_widths(model.config))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"load before: {open('/proc/loadavg').read().strip()}")
    print(f"model: random Qwen2 ({args.shape}), {n_params / 1e6:.1f}M params, hidden {model.config.hidden_size}, "
          f"{args.device}, {torch.get_num_threads()} thread(s); matmul rate now {args.gflops:.0f} GFLOP/s; "
          f"k_solver={args.k_solver}, chunk_size={args.chunk}")  # fmt: skip
    header = (f"{'T':>5} {'fwdbwd_s':>9} {'fb_floor':>8} {'qvo_s':>8} {'x_fb':>6} {'qkvo_s':>8} {'x_fb':>6} "
              f"{'floor':>6} {'growth':>7} {'exp':>5} {'fb_MB':>7} {'qkvo_MB':>8} {'max_rel_err':>11}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for T in args.lengths:
        row = run_length(model, T, args, sync)
        prev = rows[-1] if rows else None
        row["growth"] = row["qkvo_s"] / prev["qkvo_s"] if prev else float("nan")
        row["exponent"] = math.log(row["growth"]) / math.log(T / prev["T"]) if prev else float("nan")
        rows.append(row)
        print(f"{T:>5} {row['fwdbwd_s']:>9.3f} {row['fwdbwd_floor']:>8.3f} {row['qvo_s']:>8.3f} "
              f"{row['qvo_x_fb']:>6.2f} {row['qkvo_s']:>8.3f} {row['qkvo_x_fb']:>6.2f} {row['qkvo_floor']:>6.3f} "
              f"{row['growth']:>7.2f} {row['exponent']:>5.2f} {row['fwdbwd_MB']:>7.0f} {row['qkvo_MB']:>8.0f} "
              f"{row['max_rel_err']:>11.2e}", flush=True)  # fmt: skip
    print(f"load after: {open('/proc/loadavg').read().strip()}")
    at4 = min(rows, key=lambda r: abs(r["T"] - 4096))
    at2 = min(rows, key=lambda r: abs(r["T"] - 2048))
    growth = at4["qkvo_s"] / at2["qkvo_s"] if at4 is not at2 else float("nan")
    err = max(r["max_rel_err"] for r in rows)
    print(f"RESULT qkvo_over_fwdbwd_4k={at4['qkvo_x_fb']:.2f} growth_2k_4k={growth:.2f} max_rel_err={err:.2e}")


if __name__ == "__main__":
    main()
