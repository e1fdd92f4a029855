"""Rollout speed: HF ``generate`` (:class:`HFGenerator`) against the lean decode loop (:class:`DecodeLoopGenerator`).

The embedded default's policy and RL settings (configs/tiny.yaml: tiny Qwen2, hidden 128, 4 layers, G=8,
64 new tokens), ``--batch`` arithmetic prompts per call. Both sides sample from the same random-init policy
(it rarely emits eos, so both run all ``max_new_tokens`` steps); each repeat runs both, alternating who goes
first, after one untimed warm-up each; the best of ``--repeats`` counts. A greedy call on the same prompts
checks that both sides emit the same tokens; the sampled calls share their seed, so their samples are compared
too (the same distribution and the same ``torch.multinomial`` draws give the same tokens).

Beside the seconds, each side's FLOPs (its matmuls and attention: HF prefills ``B * G`` prompt rows, the lean
loop ``B``) over the matmul rate measured in the same run (``F.linear`` at the decode shapes, best of several)
give its fraction of the compute floor. Usage::

    python benchmarks/generation.py [--batch 16] [--repeats 5] [--threads 1]

The last line is ``RESULT fast_over_hf=<best fast / best HF> greedy_identical=<true|false>
sampled_identical=<true|false>``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from corrpo.batching import encode_prompts  # noqa: E402
from corrpo.config import RLConfig  # noqa: E402
from corrpo.data.arithmetic import ArithmeticTask  # noqa: E402
from corrpo.fast_decode import DecodeLoopGenerator  # noqa: E402
from corrpo.models import TinyArchitecture, load_policy  # noqa: E402
from corrpo.rollout import HFGenerator  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def matmul_gflops(n: int, d: int, out: int, repeats: int = 50) -> float:
    """GFLOP/s of ``F.linear`` on ``[n, d] x [d, out]``, best of ``repeats`` batches of 20 calls."""
    x, w = torch.randn(n, d), torch.randn(out, d)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(20):
            F.linear(x, w)
        best = min(best, (time.perf_counter() - start) / 20)
    return 2 * n * d * out / best / 1e9


def forward_flops(config, rows: int, new_positions: int, context: float) -> float:
    """Matmul + attention FLOPs of ``rows`` sequences each running ``new_positions`` tokens at mean ``context``."""
    d, inner, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or d // heads
    d_kv = config.num_key_value_heads * d_head
    per_layer = 2 * d * (d + 2 * d_kv) + 2 * d * d + 3 * 2 * d * inner + 2 * 2 * heads * d_head * context
    per_token = config.num_hidden_layers * per_layer + 2 * d * config.vocab_size
    return rows * new_positions * per_token


def timed(generator, model, ids, mask, G, sampling, eos, pad, greedy=False):
    start = time.perf_counter()
    rollout = generator.generate(model, ids, mask, G, sampling, eos, pad, greedy=greedy)
    return time.perf_counter() - start, rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side (best counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_cfg = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    rl = RLConfig(**model_cfg["rl"])
    model, tokenizer = load_policy(model_cfg["policy"], TinyArchitecture(**model_cfg["tiny"]), seed=args.seed)
    model.eval()
    records = ArithmeticTask().records("train", args.batch)
    enc = encode_prompts(tokenizer, [r["prompt"] for r in records], rl.max_prompt_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    G, sampling, eos, pad = rl.num_generations, rl.sampling, tokenizer.eos_token_id, tokenizer.pad_token_id
    sides = {"hf": HFGenerator(), "fast": DecodeLoopGenerator()}

    best = {name: float("inf") for name in sides}
    steps, sampled = {}, {}
    for repeat in range(args.repeats + 1):  # repeat 0 is the untimed warm-up
        order = list(sides) if repeat % 2 else list(sides)[::-1]
        for name in order:
            torch.manual_seed(args.seed * 1009 + repeat)
            seconds, rollout = timed(sides[name], model, ids, mask, G, sampling, eos, pad)
            steps[name] = rollout.completion_mask.shape[1]
            sampled[name] = rollout.sequences
            if repeat:
                best[name] = min(best[name], seconds)
    reason = sides["fast"].fallback_reason
    greedy = {name: timed(gen, model, ids, mask, 1, sampling, eos, pad, greedy=True)[1] for name, gen in sides.items()}
    identical = torch.equal(greedy["hf"].sequences, greedy["fast"].sequences)
    same_samples = torch.equal(sampled["hf"], sampled["fast"])  # same seed, same distribution, same draws

    gflops = matmul_gflops(ids.shape[0] * G, model.config.hidden_size, model.config.intermediate_size)
    B, P = ids.shape
    prompt_ctx, new = P / 2, steps["fast"]
    decode = forward_flops(model.config, B * G, new, P + new / 2)
    flops = {
        "hf": forward_flops(model.config, B * G, P, prompt_ctx) + decode,
        "fast": forward_flops(model.config, B, P, prompt_ctx) + decode,
    }
    print(
        f"device=cpu threads={torch.get_num_threads()} prompts={B} G={G} prompt_width={P} "
        f"max_new_tokens={sampling.max_new_tokens} steps_run={steps} fallback={reason!r}\n"
        f"model=configs/tiny.yaml model.tiny (random init); matmul rate {gflops:.1f} GFLOP/s "
        f"(F.linear [{B * G}, {model.config.hidden_size}] x [{model.config.hidden_size}, "
        f"{model.config.intermediate_size}], best of 50)"
    )
    print(f"{'side':<6}{'best s':>10}{'GFLOP':>10}{'floor s':>10}{'of floor':>10}{'ratio':>8}")
    for name in sides:
        floor = flops[name] / gflops / 1e9
        print(
            f"{name:<6}{best[name]:>10.4f}{flops[name] / 1e9:>10.3f}{floor:>10.4f}"
            f"{floor / best[name]:>10.3f}{best[name] / best['hf']:>8.3f}"
        )
    print(
        f"RESULT fast_over_hf={best['fast'] / best['hf']:.4f} greedy_identical={str(identical).lower()} "
        f"sampled_identical={str(same_samples).lower()}"
    )


if __name__ == "__main__":
    main()
