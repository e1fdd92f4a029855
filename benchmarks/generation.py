"""Rollout speed: HF ``generate`` (:class:`HFGenerator`) against the lean decode loop (:class:`DecodeLoopGenerator`).

The embedded default's policy and RL settings (configs/tiny.yaml: tiny Qwen2, hidden 128, 4 layers, G=8,
64 new tokens), ``--batch`` arithmetic prompts per call. Both sides sample from the same random-init policy: some
rows emit eos on the way (``live_tokens`` is the share of row-steps up to each row's eos, about 0.78); HF keeps
computing them to the last step, the lean loop drops them from its batch. Both sides run in turn, ``--repeats``
rounds after one untimed warm-up each (``compute_floor.alternating_best``); each side's best counts. Every call
is seeded by its round, the same seed on both sides, so the last round's samples are compared (the same
distribution and the same ``torch.multinomial`` draws give the same tokens); a greedy call on the same prompts
checks that both sides emit the same tokens.

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
import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from compute_floor import alternating_best, decode_flops, matmul_gflops, model_widths, timed, timed_calls  # noqa: E402

from corrpo.data.arithmetic import ArithmeticTask  # noqa: E402
from corrpo.generation.decode_loop import DecodeLoopGenerator  # noqa: E402
from corrpo.generation.rollout import Generator, HFGenerator, Rollout, SamplingConfig  # noqa: E402
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


@dataclass(frozen=True)
class GenerateCall:
    """One ``generate`` call's inputs, the same for every side: the policy, the prompts and the RL settings."""

    model: torch.nn.Module
    ids: torch.Tensor
    mask: torch.Tensor
    num_generations: int
    sampling: SamplingConfig
    eos: int
    pad: int

    def run(self, generator: Generator, greedy: bool = False) -> Rollout:
        return generator.generate(
            self.model, self.ids, self.mask, self.num_generations, self.sampling, self.eos, self.pad, greedy=greedy
        )


def seeded_side(generator: Generator, call: GenerateCall, seed: int, last: dict, name: str):
    """One side for ``alternating_best``: its ``k``-th call (0: the warm-up) seeded ``seed * 1009 + k`` -- the same
    seed as the other side's ``k``-th call -- its rollout kept in ``last[name]``."""
    calls = itertools.count()

    def run() -> None:
        torch.manual_seed(seed * 1009 + next(calls))
        last[name] = call.run(generator)

    return run


def big_ops_split(generator: Generator, call: GenerateCall, repeats: int, seed: int) -> tuple[float, dict]:
    """The fastest of ``repeats`` sampled calls of ``generator`` with :data:`BIG_OPS` timed: ``(its seconds,
    {class: seconds})``, the classes' seconds summed per call (``compute_floor.timed_calls``). Its own loop, not
    ``best_of``: the split kept is the fastest call's, and the calls follow the timed rounds (no warm-up)."""
    best, split = float("inf"), {}
    for repeat in range(max(1, repeats)):
        torch.manual_seed(seed * 1009 + repeat + 1)
        with timed_calls(BIG_OPS) as spent:
            seconds, _ = timed(lambda: call.run(generator))
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
    ids = enc["input_ids"]
    G, sampling = rl.num_generations, rl.sampling
    call = GenerateCall(model, ids, enc["attention_mask"], G, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)
    sides = {"hf": HFGenerator(), "fast": DecodeLoopGenerator()}

    last: dict[str, Rollout] = {}
    runs = {name: seeded_side(generator, call, args.seed, last, name) for name, generator in sides.items()}
    best = alternating_best(runs, args.repeats)
    steps = {name: rollout.completion_mask.shape[1] for name, rollout in last.items()}
    lengths = {name: rollout.completion_mask.sum(1).tolist() for name, rollout in last.items()}
    reason = sides["fast"].fallback_reason
    greedy = {name: replace(call, num_generations=1).run(gen, greedy=True) for name, gen in sides.items()}
    identical = torch.equal(greedy["hf"].sequences, greedy["fast"].sequences)
    same_samples = torch.equal(last["hf"].sequences, last["fast"].sequences)  # same seed, distribution and draws

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
    seconds, split = big_ops_split(sides["fast"], call, args.repeats, args.seed)
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
