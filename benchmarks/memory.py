"""Peak memory of corrpo's steps on a Qwen2.5-0.5B-shaped model, against a plain transformers training step.

The model has Qwen2.5-0.5B's shape (vocab 151,936, 24 layers, hidden 896, 14 heads / 2 KV heads, intermediate
4864, tied embeddings: 494M parameters), random weights, built offline and saved once with the project's character
tokenizer (``--model-dir``). Each measurement runs in ITS OWN PROCESS (this script re-started with ``--child``), so
one peak cannot hide another: peak RSS on the CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on a GPU.

- ``plain``: the baseline, a plain transformers step (``model(ids, labels=ids, use_cache=False)``, backward,
  ``AdamW(fused=True)`` where the CPU has it, else ``foreach=False``) on 4 x 64 tokens, the batch shape of every
  corrpo step below, so one baseline serves them all;
- ``sft``: one corrpo SFT step (``sft_step`` with the module's optimizer), 4 sequences of 64 tokens;
- ``grpo``: one corrpo GRPO step (``GRPOStep``: generate, score, update), 2 prompts of 32 tokens x G=2, 32 new
  tokens each: 4 x 64 tokens;
- ``corrpo_qkvo`` / ``corrpo_qvo``: the same step with the CorR-PO term on (``rl.inversion.coef 0.1``), strength on
  the paper's last-layer q,k,v,o and on the default q,v,o;
- ``fit``: ``trainer.fit`` of the module through one SFT and one RL step with a last-checkpoint callback: its peak
  and the checkpoint's size (weights + ONE AdamW state: the SFT moments are released at the boundary);
- ``runtime``: the Python/torch/corrpo imports alone, no model (what every row carries).

Bytes a parameter are printed beside the 16 B/param floor of fp32 weights + gradients + AdamW moments. Usage::

    python benchmarks/memory.py [--tiny] [--rows plain sft grpo ...] [--model-dir DIR] [--json out.json]

``--tiny`` runs every row on a small model (a quick check of the script). The last line is ``RESULT
sft_over_plain=<a> grpo_over_plain=<b> corrpo_over_grpo_memory=<z> sft_bytes_per_param=<x>
grpo_bytes_per_param=<y> ckpt_bytes_per_param=<w>`` (``z``: the larger of the two CorR-PO rows over GRPO).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # corrpo and callbacks from a checkout not pip-installed

ROWS = ("runtime", "plain", "sft", "grpo", "corrpo_qkvo", "corrpo_qvo", "fit")
QWEN2_5_0_5B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936)  # fmt: skip
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=192, vocab_size=4096)  # fmt: skip
BATCH, SEQ = 4, 64  # the baseline's and every step's token budget: 4 x 64
PROMPTS, G, NEW_TOKENS = 2, 2, 32  # GRPO: 2 prompts x G=2 completions, 32-token prompts + 32 new tokens
MODEL_DIR = Path(tempfile.gettempdir()) / "corrpo-memory-qwen2.5-0.5b-shape"
FLOOR = 16.0  # fp32 weights 4 + gradients 4 + AdamW moments 8 bytes a parameter


def completion_length(prompts, completions, **kwargs):
    """A reward with variance within a group (``len / 100``), so the GRPO advantages are not all 0."""
    return [len(c) / 100 for c in completions]


# ----------------------------------------------------------------------------------------------- children
def build_model(folder: Path, shape: dict) -> None:
    """The random model of ``shape`` with the character tokenizer, saved to ``folder`` (skipped when there)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from corrpo.models.loading import build_char_tokenizer

    if (folder / "config.json").is_file():
        return
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6,
                         rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def sft_texts() -> tuple[list[str], list[str]]:
    """4 examples of exactly 64 tokens (31 prompt + 32 completion characters + eos) with the char tokenizer."""
    prompts = [f"Q{i}: what is {i}3 + 4{i}? Think. "[:31] for i in range(BATCH)]
    completions = [f"{i}3 + 4{i} = {i + 4}{3 + i}, so the answer is"[:32].ljust(32, ".") for i in range(BATCH)]
    return prompts, completions


def rl_prompts() -> list[str]:
    """2 prompts of exactly 32 tokens."""
    return [f"P{i}: compute {i}7 * 3{i} step by step"[:32].ljust(32, " ") for i in range(PROMPTS)]


def measure_plain(folder: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    except (RuntimeError, ValueError):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    ids = torch.randint(10, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"shape": f"{BATCH}x{SEQ}", "seconds": time.perf_counter() - start, "tokens": BATCH * SEQ}


def corrpo_module(folder: Path, device: str, coef: float = 0.0, projections: list[str] | None = None):
    from corrpo.generation.rollout import SamplingConfig
    from corrpo.module import CorrPOModule
    from corrpo.training.config import RLConfig, SFTConfig

    strength = {"projections": projections} if projections else {}
    rl = RLConfig(
        steps=1, lr=1e-6, num_generations=G, sampling=SamplingConfig(max_new_tokens=NEW_TOKENS),
        rewards=["memory:completion_length"], inversion={"coef": coef, "min_tokens": 2, "strength": strength},
    )  # fmt: skip
    module = CorrPOModule(policy=str(folder), sft=SFTConfig(steps=1, lr=1e-5, max_length=SEQ), rl=rl)
    return module.to(device)


def measure_sft(folder: Path, device: str) -> dict:
    from corrpo.training.sft import SFTContext, sft_step

    module = corrpo_module(folder, device)
    optimizer, _ = module.configure_optimizers()
    prompts, completions = sft_texts()
    start = time.perf_counter()
    result = sft_step(SFTContext(module.policy, module.tokenizer, optimizer), module.sft, prompts, completions, 0)
    assert result.update.applied
    return {"shape": f"{BATCH}x{SEQ}", "seconds": time.perf_counter() - start, "tokens": BATCH * SEQ}


def measure_rl(folder: Path, device: str, coef: float = 0.0, projections: list[str] | None = None) -> dict:
    module = corrpo_module(folder, device, coef, projections)
    _, optimizer = module.configure_optimizers()
    prompts = rl_prompts()
    start = time.perf_counter()
    result = module.grpo(module.rl_context(optimizer), prompts, ["0"] * len(prompts), rl_index=0)
    assert all(u.applied for u in result.updates)
    rows, width = len(result.completions), int(result.metrics["completions/mean_length"])
    timings = {k: round(v, 2) for k, v in result.timings.items()}
    shape = f"{rows}x({len(module.tokenizer(prompts[0])['input_ids'])}+{width})"
    return {"shape": shape, "seconds": time.perf_counter() - start, "timings": timings, "tokens": rows * SEQ}


def measure_fit(folder: Path, device: str) -> dict:
    import lightning as L

    from callbacks.checkpoint import ResumableCheckpoint
    from corrpo.data.arithmetic import ArithmeticTask
    from corrpo.data.datamodule import ReasoningDataModule

    module = corrpo_module(folder, device)
    module.eval_batch_size = 1
    data = ReasoningDataModule(arithmetic=ArithmeticTask(), n_train=16, sft_steps=1, rl_steps=1, sft_batch_size=BATCH,
                               rl_batch_size=PROMPTS, n_test=1, n_probe=1)  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="corrpo-memory-fit-"))
    checkpoint = ResumableCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(max_epochs=1, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
                        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    last = root / "checkpoints" / "last.ckpt"
    import torch

    # the peak of the run itself, before this process reads the checkpoint back (mmap: its tensors stay on disk)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()
    states = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["optimizer_states"]
    out = {"shape": "1 SFT + 1 RL", "seconds": time.perf_counter() - start, "ckpt_bytes": last.stat().st_size,
           "optimizer_states_kept": sum(bool(s["state"]) for s in states), "peak_bytes": peak}  # fmt: skip
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return out


def child(row: str, folder: Path, device: str) -> dict:
    """Run one measurement in this process and return its numbers (peak memory included)."""
    import torch

    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if row == "runtime":
        import corrpo.module  # noqa: F401

        out: dict = {"shape": "-"}
    elif row == "plain":
        out = measure_plain(folder, device)
    elif row == "sft":
        out = measure_sft(folder, device)
    elif row == "grpo":
        out = measure_rl(folder, device)
    elif row == "corrpo_qkvo":
        out = measure_rl(folder, device, 0.1, ["q", "k", "v", "o"])
    elif row == "corrpo_qvo":
        out = measure_rl(folder, device, 0.1, None)
    elif row == "fit":
        out = measure_fit(folder, device)
    else:
        raise ValueError(f"unknown row {row!r}; expected one of {ROWS}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    out["params"] = parameter_count(config)
    if "peak_bytes" not in out:
        out["peak_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()
    return out


def peak_rss() -> int:
    """This process's peak resident set, in bytes: ``VmHWM`` (the high-water mark of its own address space).

    Not ``ru_maxrss``: Linux carries it over ``execve`` from the forked parent, so a child started by a parent that
    holds the model would report the parent's size."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parameter_count(config) -> int:
    """Parameters of a tied-embedding Qwen2 of ``config`` (no need to build it)."""
    d, f, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    attention = d * d + d + 2 * (d * kv + kv) + d * d
    return v * d + n * (attention + 3 * d * f + 2 * d) + d


# ------------------------------------------------------------------------------------------------ parent
def run_child(row: str, folder: Path, device: str) -> dict:
    command = [sys.executable, __file__, "--child", row, "--model-dir", str(folder), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURE ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"row {row} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("MEASURE ") :])


def table(results: dict[str, dict], device: str) -> list[str]:
    base = results.get("plain", {}).get("peak_bytes")
    what = "peak RSS" if device == "cpu" else "max_memory_allocated"
    lines = [f"{'row':<12} {'shape':<12} {what + ' GB':>18} {'B/param':>8} {'floor':>6} {'x plain':>8} {'s':>7}"]
    for row, r in results.items():
        ratio = f"{r['peak_bytes'] / base:8.3f}" if base and row != "runtime" else f"{'-':>8}"
        lines.append(
            f"{row:<12} {r['shape']:<12} {r['peak_bytes'] / 1e9:18.2f} {r['peak_bytes'] / r['params']:8.2f} "
            f"{FLOOR:6.0f} {ratio} {r.get('seconds', 0.0):7.1f}"
        )
    if "fit" in results:
        fit = results["fit"]
        lines.append(
            f"checkpoint (fit): {fit['ckpt_bytes'] / 1e9:.2f} GB = {fit['ckpt_bytes'] / fit['params']:.2f} B/param "
            f"(fp32 weights 4 + one AdamW state 8 = 12); optimizer states kept: {fit['optimizer_states_kept']}"
        )
    return lines


def result_line(results: dict[str, dict]) -> str:
    def peak(row: str) -> float:
        return results[row]["peak_bytes"] if row in results else float("nan")

    params = next(iter(results.values()))["params"]
    corrpo = max(peak("corrpo_qkvo"), peak("corrpo_qvo"))
    ckpt = results["fit"]["ckpt_bytes"] / params if "fit" in results else float("nan")
    return (
        f"RESULT sft_over_plain={peak('sft') / peak('plain'):.3f} grpo_over_plain={peak('grpo') / peak('plain'):.3f} "
        f"corrpo_over_grpo_memory={corrpo / peak('grpo'):.3f} sft_bytes_per_param={peak('sft') / params:.2f} "
        f"grpo_bytes_per_param={peak('grpo') / params:.2f} ckpt_bytes_per_param={ckpt:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model instead of the 0.5B shape")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "build":
        build_model(args.model_dir, TINY if args.tiny else QWEN2_5_0_5B)
        return
    if args.child:
        print("MEASURE " + json.dumps(child(args.child, args.model_dir, args.device)), flush=True)
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = args.model_dir or (MODEL_DIR.with_name(MODEL_DIR.name + "-tiny") if args.tiny else MODEL_DIR)
    if not (folder / "config.json").is_file():  # in a child too: this process stays small
        build = [sys.executable, __file__, "--child", "build", "--model-dir", str(folder), "--device", device]
        subprocess.run(build + (["--tiny"] if args.tiny else []), check=True)
    results = {}
    for row in args.rows:
        results[row] = run_child(row, folder, device)
        print(f"[memory] {row}: {results[row]['peak_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    for line in table(results, device):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if {"plain", "sft", "grpo"} <= set(results):
        print(result_line(results))


if __name__ == "__main__":
    main()
