"""Rollout speed: HF ``generate`` (:class:`HFGenerator`) against the lean decode loop (:class:`DecodeLoopGenerator`).

The embedded default's policy and RL settings (configs/tiny.yaml: tiny Qwen2, hidden 128, 4 layers, G=8,
64 new tokens), ``--batch`` arithmetic prompts per call. Both sides sample from the same random-init policy: some
rows emit eos on the way (``live_tokens`` is the share of row-steps up to each row's eos, about 0.78); HF keeps
computing them to the last step, the lean loop drops them from its batch. Each repeat runs both, alternating who
goes first, after one untimed warm-up each; the best of ``--repeats`` counts. A greedy call on the same prompts
checks that both sides emit the same tokens; the sampled calls share their seed, so their samples are compared
too (the same distribution and the same ``torch.multinomial`` draws give the same tokens).

Beside the seconds, each side's FLOPs (``benchmarks/compute_floor.py``'s ``decode_flops``: HF prefills ``B * G``
prompt rows and decodes every row to the last step, the lean loop prefills ``B`` and decodes each row to its eos)
over the matmul rate measured in the same run give its fraction of the compute floor. Then ``--repeats`` more
sampled calls of the lean loop run with its big ops timed (``compute_floor.timed_calls``): the linear maps
(``F.linear``), the attention products (``torch.baddbmm`` / ``torch.bmm``) and the random draws
(``Tensor.exponential_``, the numbers HF draws too); the fastest call's split says how much of the loop is the
small ops between them, and ``big_ops_over_hf`` what ``fast_over_hf`` would be were those free. Usage::

    python benchmarks/generation.py [--batch 16] [--repeats 5] [--threads 1]

The last line is ``RESULT fast_over_hf=<best fast / best HF> greedy_identical=<true|false>
sampled_identical=<true|false> big_ops_over_hf=<the big ops of the fastest timed-split call / best HF>``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from compute_floor import decode_flops, matmul_gflops, model_widths, timed_calls  # noqa: E402

from corrpo.data.arithmetic import ArithmeticTask  # noqa: E402
from corrpo.generation.decode_loop import DecodeLoopGenerator  # noqa: E402
from corrpo.generation.rollout import HFGenerator  # noqa: E402
from corrpo.models.batching import encode_prompts  # noqa: E402
from corrpo.models.loading import TinyArchitecture, load_policy  # noqa: E402
from corrpo.training.config import RLConfig  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
BIG_OPS = {
    "linear maps": [(torch.nn.functional, "linear")],
    "attention products": [(torch, "baddbmm"), (torch, "bmm")],
    "random draws": [(torch.Tensor, "exponential_")],
}
"""The lean loop's big ops, by the functions it (and the HF prefill it runs) calls: what the split times."""


def timed(generator, model, ids, mask, G, sampling, eos, pad, greedy=False):
    start = time.perf_counter()
    rollout = generator.generate(model, ids, mask, G, sampling, eos, pad, greedy=greedy)
    return time.perf_counter() - start, rollout


def big_ops_split(generator, model, ids, mask, G, sampling, eos, pad, repeats, seed):
    """The fastest of ``repeats`` sampled calls of ``generator`` with :data:`BIG_OPS` timed: ``(its seconds,
    {class: seconds})``, the classes' seconds summed per call (``compute_floor.timed_calls``)."""
    best, split = float("inf"), {}
    for repeat in range(max(1, repeats)):
        torch.manual_seed(seed * 1009 + repeat + 1)
        with timed_calls(BIG_OPS) as spent:
            seconds, _ = timed(generator, model, ids, mask, G, sampling, eos, pad)
        if seconds < best:
            best, split = seconds, {name: record["seconds"] for name, record in spent.items()}
    return best, split


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
    steps, sampled, lengths = {}, {}, {}
    for repeat in range(args.repeats + 1):  # repeat 0 is the untimed warm-up
        order = list(sides) if repeat % 2 else list(sides)[::-1]
        for name in order:
            torch.manual_seed(args.seed * 1009 + repeat)
            seconds, rollout = timed(sides[name], model, ids, mask, G, sampling, eos, pad)
            steps[name] = rollout.completion_mask.shape[1]
            sampled[name] = rollout.sequences
            lengths[name] = rollout.completion_mask.sum(1).tolist()
            if repeat:
                best[name] = min(best[name], seconds)
    reason = sides["fast"].fallback_reason
    greedy = {name: timed(gen, model, ids, mask, 1, sampling, eos, pad, greedy=True)[1] for name, gen in sides.items()}
    identical = torch.equal(greedy["hf"].sequences, greedy["fast"].sequences)
    same_samples = torch.equal(sampled["hf"], sampled["fast"])  # same seed, same distribution, same draws

    gflops = matmul_gflops(model.config.hidden_size, model_widths(model.config))
    B, P = ids.shape
    new = steps["fast"]
    flops = {  # HF prefills and decodes every one of the B * G rows to the last step; the lean loop prefills each
        # prompt once and stops computing a row once it has finished (its floor: each row's own length)
        "hf": decode_flops(model.config, B * G, P, new),
        "fast": decode_flops(model.config, B * G, P, lengths["fast"], prefill_rows=B),
    }
    live = sum(lengths["fast"]) / (B * G * new)
    print(
        f"device=cpu threads={torch.get_num_threads()} prompts={B} G={G} prompt_width={P} "
        f"max_new_tokens={sampling.max_new_tokens} steps_run={steps} live_tokens={live:.3f} fallback={reason!r}\n"
        f"model=configs/tiny.yaml model.tiny (random init); matmul rate {gflops:.1f} GFLOP/s "
        "(benchmarks/compute_floor.py, at the model's widths)"
    )
    print(f"{'side':<6}{'best s':>10}{'GFLOP':>10}{'floor s':>10}{'of floor':>10}{'ratio':>8}")
    for name in sides:
        floor = flops[name] / gflops / 1e9
        print(
            f"{name:<6}{best[name]:>10.4f}{flops[name] / 1e9:>10.3f}{floor:>10.4f}"
            f"{floor / best[name]:>10.3f}{best[name] / best['hf']:>8.3f}"
        )
    seconds, split = big_ops_split(sides["fast"], model, ids, mask, G, sampling, eos, pad, args.repeats, args.seed)
    split["the other ops"] = max(0.0, seconds - sum(split.values()))
    parts = ", ".join(f"{name} {secs:.4f} s ({secs / seconds:.0%})" for name, secs in split.items())
    big = (seconds - split["the other ops"]) / best["hf"]
    print(
        f"where the lean loop's time goes (the fastest of {args.repeats} more sampled calls, {seconds:.4f} s, its big "
        f"ops timed): {parts}; were the other ops free, fast_over_hf would be {big:.3f}"
    )
    print(
        f"RESULT fast_over_hf={best['fast'] / best['hf']:.4f} greedy_identical={str(identical).lower()} "
        f"sampled_identical={str(same_samples).lower()} big_ops_over_hf={big:.4f}"
    )


if __name__ == "__main__":
    main()
