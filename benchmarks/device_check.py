"""One prepared GPU check for the day a device is lent (15 minutes in all): run it once, read one JSON.

On CUDA, in under 8 minutes, on the Qwen2.5-0.5B-shaped random model (``benchmarks/memory.py``'s) in bf16:

1. ``strength``: onepass against the loop reference (last layer, q,k,v,o, nuclear) at T = 128 and 512: seconds
   of each, the speed-up and the max relative error (the DESIGN claim: exact to 1e-4, ~87x faster);
2. ``steps``: one corrpo SFT step, GRPO step and CorR-PO step (q,k,v,o and q,v,o): peak
   ``torch.cuda.max_memory_allocated``, bytes a parameter, seconds and tokens/s;
3. ``generate``: Hugging Face ``generate`` throughput (sampled tokens/s);
4. ``vllm``: :class:`corrpo.generation.vllm.VLLMGenerator`'s throughput, when vLLM is installed;
5. ``sharded``: ``benchmarks/sharded_memory.py --device cuda`` (DDP against FSDP2, peak memory per rank, 2 ranks
   on 2 GPUs over NCCL), when the machine has 2 GPUs (NCCL cannot put two ranks on one GPU); skipped otherwise
   and with ``--cpu`` (the CPU measurement is ``benchmarks/sharded_memory.py`` itself).
6. ``long_traces``: onepass q,k,v,o at T = 1024 and 4096 over one forward+backward of the same sequence, with
   each K solver (``eigh``, ``batched``), peak memory, and the error against the loop on 4 tokens;
7. ``batched_route``: 4096 rank-deficient 128-square Grams (the 0.5B model's d_kv), ``eigvalsh`` against the
   batched Newton-Schulz route: seconds each and their max relative difference (decides ``k_solver: auto``).

Every section is timed and caught on its own: a failure is written into the JSON (``error``) and the next section
runs; sections that would start past ``--budget`` seconds are skipped (``skipped``). Usage::

    python benchmarks/device_check.py [--out device_check.json] [--budget 420]
    python benchmarks/device_check.py --cpu      # the same code on tiny shapes, on the CPU (a test runs it)

The last line is ``RESULT device=<cuda|cpu> sections_ok=<n>/<m> seconds=<s> json=<path>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from memory import QWEN2_5_0_5B, build_model  # noqa: E402

CPU_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=256)  # fmt: skip


class Shapes:
    """The sizes of one run: the real ones on CUDA, tiny ones with ``--cpu``."""

    def __init__(self, cpu: bool) -> None:
        self.model = CPU_SHAPE if cpu else QWEN2_5_0_5B
        self.dtype = "float32" if cpu else "bfloat16"
        self.strength_lengths = (12, 24) if cpu else (128, 512)
        self.sft_batch, self.sft_length = (2, 24) if cpu else (8, 512)
        self.prompts, self.G, self.prompt_length, self.new_tokens = (1, 2, 8, 8) if cpu else (4, 4, 64, 256)
        self.generate_batch, self.generate_tokens = (2, 8) if cpu else (32, 256)
        self.long_lengths = (32, 64) if cpu else (1024, 4096)
        self.gram_size, self.gram_batch = (16, 8) if cpu else (128, 4096)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def strength_section(folder: Path, device: str, shapes: Shapes) -> dict:
    from transformers import AutoModelForCausalLM

    from corrpo.inversion.strength import StrengthConfig, logit_grad_strength
    from corrpo.inversion.strength_common import max_relative_error

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, shapes.dtype)).to(device)
    out = {}
    for T in shapes.strength_lengths:
        ids = torch.randint(10, 100, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        mask = torch.ones_like(ids)
        token_mask = torch.ones_like(ids, dtype=torch.bool)
        row = {}
        values = {}
        for method in ("onepass", "loop"):
            config = StrengthConfig(method=method, projections=["q", "k", "v", "o"])
            logit_grad_strength(model, ids[:, :8], mask[:, :8], token_mask[:, :8], config)  # warm-up
            synchronize(device)
            start = time.perf_counter()
            values[method] = logit_grad_strength(model, ids, mask, token_mask, config)
            synchronize(device)
            row[f"{method}_s"] = time.perf_counter() - start
        row["speedup"] = row["loop_s"] / max(row["onepass_s"], 1e-9)
        row["max_relative_error"] = max_relative_error(values["onepass"], values["loop"])
        out[f"T{T}"] = row
    return out


def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    from memory import peak_rss

    return peak_rss()  # the process's peak so far, not the step's alone


def steps_section(folder: Path, device: str, shapes: Shapes) -> dict:
    from corrpo.generation.rollout import SamplingConfig
    from corrpo.module import CorrPOModule
    from corrpo.training.config import RLConfig, SFTConfig
    from corrpo.training.sft import SFTContext, sft_step

    out = {}
    text = "0123456789+-*= abcdefghij" * 64
    prompts = [text[i : i + shapes.prompt_length] for i in range(shapes.prompts)]
    sft_prompts = [text[i : i + shapes.sft_length // 2] for i in range(shapes.sft_batch)]
    sft_completions = [text[i : i + shapes.sft_length // 2 - 1] for i in range(shapes.sft_batch)]
    for name, coef, projections in (("sft", 0.0, None), ("grpo", 0.0, None), ("corrpo_qkvo", 0.1, ["q", "k", "v", "o"]),
                                    ("corrpo_qvo", 0.1, ["q", "v", "o"])):  # fmt: skip
        peak_reset(device)
        strength = {"projections": projections} if projections else {}
        rl = RLConfig(
            steps=1, lr=1e-6, num_generations=shapes.G, sampling=SamplingConfig(max_new_tokens=shapes.new_tokens),
            rewards=["memory:completion_length"], inversion={"coef": coef, "min_tokens": 2, "strength": strength},
        )  # fmt: skip
        sft = SFTConfig(steps=1, lr=1e-5, max_length=shapes.sft_length)
        module = CorrPOModule(policy=str(folder), dtype=shapes.dtype, sft=sft, rl=rl).to(device)
        sft_opt, rl_opt = module.configure_optimizers()
        synchronize(device)
        start = time.perf_counter()
        if name == "sft":
            context = SFTContext(module.policy, module.tokenizer, sft_opt)
            result = sft_step(context, sft, sft_prompts, sft_completions, 0)
            tokens, timings = shapes.sft_batch * shapes.sft_length, {}
        else:
            result = module.grpo(module.rl_context(rl_opt), prompts, ["0"] * len(prompts), rl_index=0)
            tokens = len(result.completions) * (shapes.prompt_length + shapes.new_tokens)
            timings = {k: round(v, 3) for k, v in result.timings.items()}
        synchronize(device)
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in module.policy.parameters())
        memory = peak(device)
        out[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_bytes": memory,
                     "bytes_per_param": memory / params, "timings": timings}  # fmt: skip
        del module, sft_opt, rl_opt, result
    return out


def generate_section(folder: Path, device: str, shapes: Shapes) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, shapes.dtype)).to(device).eval()
    ids = torch.randint(10, 100, (shapes.generate_batch, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :4], max_new_tokens=2, do_sample=True)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        # eos is id 2 of a 150k vocabulary: a random model runs every row to max_new_tokens
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=shapes.generate_tokens,
                             do_sample=True, top_k=0)  # fmt: skip
        synchronize(device)
    seconds = time.perf_counter() - start
    new = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"seconds": seconds, "new_tokens": new, "tokens_per_s": new / seconds, "batch": shapes.generate_batch}


def vllm_section(folder: Path, device: str, shapes: Shapes) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"skipped": "vllm is not installed"}
    if device != "cuda":
        return {"skipped": "vllm needs a GPU"}
    from transformers import AutoModelForCausalLM

    from corrpo.generation.rollout import SamplingConfig
    from corrpo.generation.vllm import VLLMGenerator

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, shapes.dtype)).to(device)
    generator = VLLMGenerator(gpu_memory_utilization=0.3, max_model_len=1024)
    ids = torch.randint(10, 100, (shapes.generate_batch, 32), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(max_new_tokens=shapes.generate_tokens)
    start = time.perf_counter()
    generator.generate(model, ids[:2], torch.ones_like(ids[:2]), 1, SamplingConfig(max_new_tokens=2), 2, 0)  # engine
    built = time.perf_counter() - start
    start = time.perf_counter()
    rollout = generator.generate(model, ids, torch.ones_like(ids), 1, sampling, eos_token_id=2, pad_token_id=0)
    seconds = time.perf_counter() - start
    new = int(rollout.completion_mask.sum())
    return {"engine_start_s": built, "seconds": seconds, "new_tokens": new, "tokens_per_s": new / seconds}


def sharded_section(folder: Path, device: str, shapes: Shapes) -> dict:
    import subprocess

    if device != "cuda":
        return {"skipped": "a GPU check; on the CPU run benchmarks/sharded_memory.py"}
    if torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs for 2 NCCL ranks, found {torch.cuda.device_count()}"}
    script = Path(__file__).resolve().parent / "sharded_memory.py"
    # Qwen2.5-0.5B's width and depth, a 32k vocabulary: 360M parameters, 2 steps, one repeat (the 8-minute budget)
    command = [sys.executable, str(script), "--device", "cuda", "--steps", "2", "--repeats", "1", "--hidden", "896",
               "--layers", "24", "--intermediate", "4864"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = done.stdout.strip().splitlines()[-1]
    return {"result": result, "table": done.stdout[-2000:], **dict(kv.split("=") for kv in result.split()[1:])}


def long_traces_section(folder: Path, device: str, shapes: Shapes) -> dict:
    """Onepass q,k,v,o on long sequences (``benchmarks/long_traces.py``'s rows): seconds over one forward+backward
    of the same batch, peak memory, each K solver (``eigh`` / ``batched``), and the error against the loop."""
    from long_traces import fwd_bwd, peak_above
    from transformers import AutoModelForCausalLM

    from corrpo.inversion.strength import StrengthConfig, logit_grad_strength
    from corrpo.inversion.strength_common import max_relative_error

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, shapes.dtype)).to(device).eval()
    out = {}
    for T in shapes.long_lengths:
        ids = torch.randint(10, 100, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
        scored = torch.ones_like(ids, dtype=torch.bool)
        fwd_bwd(model, ids)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        fwd_bwd(model, ids)
        synchronize(device)
        row = {"fwdbwd_s": time.perf_counter() - start}
        values = {}
        for solver in ("eigh", "batched"):
            config = StrengthConfig(projections=["q", "k", "v", "o"], k_solver=solver)
            synchronize(device)
            start = time.perf_counter()
            row[f"qkvo_{solver}_MB"], values[solver] = peak_above(
                lambda c=config, i=ids, s=scored: logit_grad_strength(model, i, None, s, c), device == "cuda"
            )
            synchronize(device)
            row[f"qkvo_{solver}_s"] = time.perf_counter() - start
            row[f"qkvo_{solver}_over_fwdbwd"] = row[f"qkvo_{solver}_s"] / row["fwdbwd_s"]
        subset = torch.zeros_like(scored)
        subset[0, torch.linspace(1, T - 1, 4).round().long().unique()] = True
        loop = logit_grad_strength(model, ids, None, subset, StrengthConfig(projections=["q", "k", "v", "o"],
                                                                            method="loop"))  # fmt: skip
        for solver, value in values.items():
            row[f"{solver}_max_rel_err_vs_loop"] = max_relative_error(value[subset], loop[subset])
        row["batched_vs_eigh_max_rel"] = max_relative_error(values["batched"], values["eigh"])
        out[f"T{T}"] = row
    return out


def batched_route_section(folder: Path, device: str, shapes: Shapes) -> dict:
    """K's nuclear norm on a batch of rank-deficient d_kv-square Grams: ``eigvalsh`` against the batched
    Newton-Schulz route (``corrpo.inversion.psd_root``), seconds and the max relative difference."""
    from corrpo.inversion.psd_root import gram_nuclear

    n, batch = shapes.gram_size, shapes.gram_batch
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(batch, n, n // 2, generator=gen, dtype=torch.float64).to(device)  # rank n / 2
    gram = m @ m.mT
    out = {"n": n, "batch": batch}
    values = {}
    for solver in ("eigh", "batched"):
        gram_nuclear(gram[:2], solver)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        values[solver] = gram_nuclear(gram, solver)
        synchronize(device)
        out[f"{solver}_s"] = time.perf_counter() - start
    out["speedup_batched"] = out["eigh_s"] / max(out["batched_s"], 1e-9)
    out["max_rel_diff"] = ((values["batched"] - values["eigh"]) / values["eigh"]).abs().max().item()
    return out


SECTIONS = {"strength": strength_section, "steps": steps_section, "generate": generate_section, "vllm": vllm_section,
            "sharded": sharded_section, "long_traces": long_traces_section,
            "batched_route": batched_route_section}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (the suite's check of this script)")
    parser.add_argument("--out", type=Path, default=Path("device_check.json"))
    parser.add_argument("--budget", type=float, default=420.0, help="no section starts after this many seconds")
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    shapes = Shapes(cpu=device == "cpu")
    folder = args.model_dir or Path(tempfile.gettempdir()) / f"corrpo-device-check-{device}"
    build_model(folder, shapes.model)
    report: dict = {"device": device, "name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "dtype": shapes.dtype, "model": shapes.model}  # fmt: skip
    ok = 0
    for name, section in SECTIONS.items():
        if time.perf_counter() - t0 > args.budget:
            report[name] = {"skipped": f"past the {args.budget:.0f} s budget"}
            continue
        start = time.perf_counter()
        try:
            report[name] = section(folder, device, shapes)
            ok += "skipped" not in report[name]
        except Exception as error:  # one section's failure must not cost the others' numbers
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["section_s"] = time.perf_counter() - start
        print(f"[device_check] {name}: {json.dumps(report[name], default=str)[:400]}", file=sys.stderr, flush=True)
    report["seconds"] = time.perf_counter() - t0
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"RESULT device={device} sections_ok={ok}/{len(SECTIONS)} seconds={report['seconds']:.1f} json={args.out}")


if __name__ == "__main__":
    main()
