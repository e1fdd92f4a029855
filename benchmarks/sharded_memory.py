"""Peak memory per rank of corrpo's SFT steps, DDP against FSDP2, on 2 processes (gloo on the CPU, NCCL on GPUs).

Each side is 2 processes of THIS script (``--child``), one rank each, that build the same random Qwen2-family model
from a config (default 123M parameters: vocabulary 32,000, hidden 1,024, 8 layers, intermediate 2,816, GQA 16/4
heads, tied embeddings), wrap it, and run ``--steps`` corrpo SFT steps (:func:`corrpo.training.sft.sft_step`, the
module's fused AdamW, micro-batch = the batch) on ``4 x 128`` tokens per rank:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` with its defaults (Lightning's ``ddp`` strategy: weights,
  gradients, the gradient buckets and both AdamW moments whole on every rank, about 20 bytes a parameter);
- ``fsdp2``: :func:`corrpo.models.sharding.shard_policy` (``fully_shard`` per decoder layer, then the root), what
  ``CorrPOModule.configure_model`` does under ``ModelParallelStrategy``: each rank keeps half of every
  parameter, gradient and moment, plus one gathered layer at a time and the gathered root (embeddings).

Peak per rank: ``ru_maxrss`` of the rank's process on the CPU (it includes the ~0.4 GB of Python, torch and
transformers, printed as ``runtime``, and the full model each rank builds before sharding it), or
``torch.cuda.max_memory_allocated`` on a GPU. glibc keeps freed heap memory mapped (its mmap threshold rises to
32 MB after the first large free, so tensors of a few MB come from the heap and their pages stay counted): both
sides' ranks run with ``MALLOC_MMAP_THRESHOLD_=1048576`` (1 MiB: every larger tensor is its own mapping, returned
when freed), so ``ru_maxrss`` follows the live tensors; ``--glibc-default`` measures without it. The table prints
the setting. (Set the same variable for a real run to get the same saving.)
Both sides must give the same SFT losses (printed), so the same work is measured. Each side runs ``--repeats``
times; the best (lowest) peak of each is kept. Usage::

    python benchmarks/sharded_memory.py [--device cpu|cuda] [--steps 2] [--repeats 2] [--hidden 1536 --layers 8]
        [--glibc-default]

The last line is ``RESULT fsdp_over_ddp_memory_per_rank=<x> ddp_gb=<a> fsdp2_gb=<b> params_m=<p>`` where ``x`` is
the larger rank's FSDP2 peak over the larger rank's DDP peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # corrpo from a checkout not pip-installed

WORLD = 2
BATCH, SEQ = 4, 128  # rows per rank, tokens per row (prompt + completion)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ----------------------------------------------------------------------------------------------- child
def child(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, Qwen2Config

    from corrpo.models.loading import build_char_tokenizer
    from corrpo.models.sharding import ShardingConfig, shard_policy
    from corrpo.training.collectives import Collectives
    from corrpo.training.config import SFTConfig
    from corrpo.training.sft import SFTContext, sft_step
    from corrpo.training.update import adamw

    rank = int(os.environ["RANK"])
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=WORLD)
    runtime = _rss_bytes()

    class Ranks(Collectives):  # the reductions sft_step needs, straight through torch.distributed
        world_size, rank = WORLD, dist.get_rank()

        def mean(self, value):
            value = value.clone()
            dist.all_reduce(value)
            return value / WORLD

        def all_true(self, flag):
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return bool(t.item())

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=4, intermediate_size=args.intermediate,
                         tie_word_embeddings=True, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    if args.child == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    else:
        wrapped = shard_policy(model, torch.distributed.device_mesh.init_device_mesh(args.device, (WORLD,)),
                               ShardingConfig())  # fmt: skip
    optimizer = adamw([p for p in wrapped.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    text = "0123456789+-*= abcdefghij" * 40
    rows = range(rank * BATCH, (rank + 1) * BATCH)  # this rank's share of the global batch
    prompts = [text[i : i + SEQ // 2] for i in rows]
    completions = [text[i + 7 : i + 7 + SEQ // 2 - 1] for i in rows]
    sft = SFTConfig(steps=args.steps, lr=1e-5, warmup_steps=0, max_length=SEQ, max_grad_norm=1.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        context = SFTContext(wrapped, tokenizer, optimizer, collectives=Ranks())
        result = sft_step(context, sft, prompts, completions, step)
        losses.append(float(result.loss.item()))
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_bytes()
    row = {"mode": args.child, "rank": rank, "params": params, "peak_bytes": peak, "runtime_bytes": runtime,
           "losses": losses, "seconds": seconds}  # fmt: skip
    Path(args.out).write_text(json.dumps(row))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- parent
def launch(mode: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if not args.glibc_default:
            env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
        out = folder / f"{mode}-{rank}.json"
        command = [sys.executable, __file__, "--child", mode, "--out", str(out), "--device", args.device,
                   "--steps", str(args.steps), "--hidden", str(args.hidden), "--layers", str(args.layers),
                   "--intermediate", str(args.intermediate), "--vocab", str(args.vocab)]  # fmt: skip
        procs.append((subprocess.Popen(command, env=env), out))
    for proc, _ in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{mode}: a rank failed (exit {proc.returncode})")
    return [json.loads(out.read_text()) for _, out in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--child", choices=("ddp", "fsdp2"), default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's mmap threshold dynamic")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    best: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="corrpo-sharded-memory-") as tmp:
        for repeat in range(args.repeats):
            for mode in ("ddp", "fsdp2"):
                rows = launch(mode, args, Path(tmp))
                peak = max(r["peak_bytes"] for r in rows)
                if mode not in best or peak < max(r["peak_bytes"] for r in best[mode]):
                    best[mode] = rows
                peaks = [round(r["peak_bytes"] / 2**30, 3) for r in rows]
                print(f"[sharded_memory] repeat {repeat} {mode}: peak per rank {peaks} GB", file=sys.stderr, flush=True)
    params = best["ddp"][0]["params"]
    gb = 2**30
    print(f"model: {params / 1e6:.1f}M parameters, {WORLD} ranks x {BATCH} x {SEQ} tokens, {args.steps} SFT steps, "
          f"device {args.device}, best of {args.repeats}, "
          f"MALLOC_MMAP_THRESHOLD_={'unset (glibc default)' if args.glibc_default else '1048576'}")  # fmt: skip
    print(f"{'mode':<6} {'rank':>4} {'peak GB':>8} {'runtime GB':>10} {'B/param':>8} {'B/param above runtime':>22} "
          f"{'s':>6}  losses")  # fmt: skip
    for mode in ("ddp", "fsdp2"):
        for r in best[mode]:
            above = (r["peak_bytes"] - (r["runtime_bytes"] if args.device == "cpu" else 0)) / params
            print(f"{mode:<6} {r['rank']:>4} {r['peak_bytes'] / gb:>8.3f} {r['runtime_bytes'] / gb:>10.3f} "
                  f"{r['peak_bytes'] / params:>8.2f} {above:>22.2f} {r['seconds']:>6.1f}  "
                  f"{[round(v, 6) for v in r['losses']]}")  # fmt: skip
    ddp = max(r["peak_bytes"] for r in best["ddp"])
    fsdp = max(r["peak_bytes"] for r in best["fsdp2"])
    same = all(
        abs(a - b) <= 1e-5 * abs(a)
        for ra, rb in zip(best["ddp"], best["fsdp2"], strict=True)
        for a, b in zip(ra["losses"], rb["losses"], strict=True)
    )
    print(f"ratio fsdp2 / ddp (larger rank each): {fsdp / ddp:.3f}; same SFT losses on both sides (rel 1e-5): {same}")
    if args.json:
        args.json.write_text(json.dumps({"ddp": best["ddp"], "fsdp2": best["fsdp2"], "ratio": fsdp / ddp}, indent=2))
    print(f"RESULT fsdp_over_ddp_memory_per_rank={fsdp / ddp:.3f} ddp_gb={ddp / gb:.3f} fsdp2_gb={fsdp / gb:.3f} "
          f"params_m={params / 1e6:.1f} same_losses={same}")  # fmt: skip


if __name__ == "__main__":
    main()
