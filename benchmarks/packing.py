"""Packed (padding-free) against padded training forwards: one SFT step and one RL update's forward + backward,
same batch, same model, same run.

- SFT: :func:`corrpo.training.sft.sft_step` on ``--sft-batch`` traces of the embedded task (configs/tiny.yaml's
  model, ``max_length`` 128), ``sft.packing`` false vs true.
- RL: the update's compute on one rollout of ``--prompts x --G`` completions (up to ``--new-tokens``, temperature 1,
  from the tiny policy after ``--sft-steps`` SFT steps so completions end at different lengths, as in training):
  :func:`corrpo.training.forward.completion_log_probs` and a backward of the masked log-prob sum, padded vs packed.

Both sides alternate (padded, packed, padded, ...) ``--repeats`` times after a warm-up each; each side's figure is
its best (``alternating_best`` of ``benchmarks/compute_floor.py``). Every row prints its density (real tokens over
the slots the forward runs) and its compute-floor fraction (real tokens' FLOPs, 3x the forward, over the matmul
rate measured in this run: ``benchmarks/compute_floor.py``).
The same run checks that both sides give the same loss (relative difference printed). Usage::

    python benchmarks/packing.py [--threads 1 --repeats 10]

Last line: ``RESULT sft_packed_over_padded=<x> rl_packed_over_padded=<y>``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import yaml  # noqa: E402
from compute_floor import (  # noqa: E402
    alternating_best,
    floor_fraction,
    forward_flops,
    matmul_gflops,
    model_widths,
)

from corrpo.data.arithmetic import ArithmeticTask  # noqa: E402
from corrpo.generation.rollout import SamplingConfig  # noqa: E402
from corrpo.models.batching import encode_sft_batch  # noqa: E402
from corrpo.models.loading import TinyArchitecture  # noqa: E402
from corrpo.models.packing import PackedBatch  # noqa: E402
from corrpo.module import CorrPOModule  # noqa: E402
from corrpo.training.config import SFTConfig  # noqa: E402
from corrpo.training.forward import completion_log_probs  # noqa: E402
from corrpo.training.sft import SFTContext, sft_step  # noqa: E402
from corrpo.training.update import adamw  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def real_flops(config, lengths: list[int], unembedded: list[int]) -> int:
    """A training step's floor over the real tokens: 3x the forward of each sequence on its own."""
    return 3 * sum(forward_flops(config, 1, n, u) for n, u in zip(lengths, unembedded, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sft-steps", type=int, default=60, help="SFT steps before the rollout is sampled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_cfg = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    module = CorrPOModule(policy=model_cfg["policy"], tiny=TinyArchitecture(**model_cfg["tiny"]), seed=0)
    policy, tokenizer, config = module.policy, module.tokenizer, module.policy.config
    gflops = matmul_gflops(config.hidden_size, model_widths(config))
    task = ArithmeticTask()
    records = task.records("train", args.sft_batch * (args.sft_steps + 1))
    batches = [records[i : i + args.sft_batch] for i in range(0, len(records), args.sft_batch)]

    # a policy that has started to learn the format, so completions stop at different lengths
    warm = SFTConfig(steps=args.sft_steps, lr=1e-3, max_length=128)
    optimizer = adamw(policy.parameters(), warm.lr, 0.0)
    policy.train()
    for step, batch in enumerate(batches[: args.sft_steps]):
        sft_step(SFTContext(policy, tokenizer, optimizer), warm, [r["prompt"] for r in batch],
                 [r["completion"] for r in batch], step)  # fmt: skip

    rows = []
    # SFT: a full step (forward, backward, update) on one batch; SGD at lr 0 keeps the weights, so every repeat
    # runs the same step
    batch = batches[-1]
    prompts, completions = [r["prompt"] for r in batch], [r["completion"] for r in batch]
    sgd = torch.optim.SGD(policy.parameters(), lr=0.0)
    losses = {}

    def sft_side(packing: bool):
        sft = SFTConfig(steps=1, lr=1e-12, max_length=128, packing=packing)
        return lambda: losses.__setitem__(
            packing, float(sft_step(SFTContext(policy, tokenizer, sgd), sft, prompts, completions, 0).loss)
        )

    best = alternating_best({"padded": sft_side(False), "packed": sft_side(True)}, args.repeats)
    enc = encode_sft_batch(tokenizer, prompts, completions, 128)
    lengths = enc["attention_mask"].sum(1).tolist()
    flops = real_flops(config, lengths, lengths)
    packed = PackedBatch.build(enc["input_ids"], enc["attention_mask"], config.hidden_size)
    rows.append(("sft", best, sum(lengths) / enc["input_ids"].numel(), packed.density, flops, losses))

    # RL: the update's forward + backward on one rollout
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens)
    torch.manual_seed(0)
    rollout = module.generate_rollout([r["prompt"] for r in records[: args.prompts]], args.G, sampling=sampling)
    rl_losses = {}

    def rl_side(packing: bool):
        def run():
            policy.zero_grad(set_to_none=True)
            log_probs, _ = completion_log_probs(policy, rollout, packed=packing)
            loss = -(log_probs * rollout.completion_mask).sum() / rollout.completion_mask.sum()
            loss.backward()
            rl_losses[packing] = float(loss.detach())

        return run

    best_rl = alternating_best({"padded": rl_side(False), "packed": rl_side(True)}, args.repeats)
    lengths = rollout.attention_mask.sum(1).tolist()
    keep = rollout.completion_mask.shape[1] + 1
    flops = real_flops(config, lengths, [keep] * len(lengths))
    packed = PackedBatch.build(rollout.sequences, rollout.attention_mask, config.hidden_size)
    density = sum(lengths) / rollout.sequences.numel()
    rows.append(("rl update", best_rl, density, packed.density, flops, rl_losses))

    print(
        f"cpu threads={args.threads}, best of {args.repeats} alternating after a warm-up; matmul {gflops:.0f} GFLOP/s"
    )
    print(f"{'part':<10} {'padded s':>9} {'packed s':>9} {'ratio':>6} {'dens pad':>9} {'dens pack':>9} "
          f"{'fl pad':>7} {'fl pack':>7} {'loss rel diff':>13}")  # fmt: skip
    ratios = {}
    for name, best, dens_pad, dens_pack, flops, loss in rows:
        ratio = best["packed"] / best["padded"]
        ratios[name] = ratio
        diff = abs(loss[True] - loss[False]) / max(abs(loss[False]), 1e-30)
        floors = [floor_fraction(flops, gflops, best[side]) for side in ("padded", "packed")]
        print(f"{name:<10} {best['padded']:9.4f} {best['packed']:9.4f} {ratio:6.3f} {dens_pad:9.3f} {dens_pack:9.3f} "
              f"{floors[0]:7.3f} {floors[1]:7.3f} {diff:13.1e}")  # fmt: skip
    print("losses (padded, packed):", [(name, loss[False], loss[True]) for name, *_, loss in rows])
    print(f"RESULT sft_packed_over_padded={ratios['sft']:.4f} rl_packed_over_padded={ratios['rl update']:.4f}")


if __name__ == "__main__":
    main()
