"""Time one RL step of plain GRPO and of CorR-PO (same config, same run), part by part.

Both sides run :class:`corrpo.training.grpo.GRPOStep`, the very code ``corrpo fit`` runs, and read its
per-stage timings: (a) ``generate``: G samples per prompt, (b) ``score``: task rewards, (c) CorR-PO only:
``inversion``, the reward term (one onepass scoring pass over all ``B * G`` responses), (d) ``update``: forward,
clipped loss, backward, AdamW step. The two methods run on two modules built from the same seed and are
interleaved step by step (alternating who goes first), so machine load hits both alike; one untimed warm-up
step each comes first. Usage::

    python benchmarks/rl_step.py --steps 10 --batch 8 --G 8 [--threads 1]

The last line is ``RESULT corrpo_over_grpo=<total time ratio>``.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
import yaml  # noqa: E402

from corrpo.config import RLConfig  # noqa: E402
from corrpo.data.arithmetic import ArithmeticTask  # noqa: E402
from corrpo.models import TinyArchitecture  # noqa: E402
from corrpo.module import CorrPOModule  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PARTS = ("generate", "score", "inversion", "update")


def build(G: int, seed: int, inversion: dict) -> tuple[CorrPOModule, torch.optim.Optimizer]:
    """The model and RL settings of configs/tiny.yaml itself (so the benchmark cannot drift from the default),
    with ``G`` completions per prompt and the CorR-PO term ``inversion`` (``coef 0`` = plain GRPO)."""
    model_cfg = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    rl = RLConfig(**{**model_cfg["rl"], "num_generations": G, "inversion": inversion})
    tiny = TinyArchitecture(**model_cfg["tiny"])
    module = CorrPOModule(policy=model_cfg["policy"], tiny=tiny, rl=rl, seed=seed)
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=rl.lr)
    return module, optimizer


def rl_step(module: CorrPOModule, optimizer: torch.optim.Optimizer, records: list[dict], step: int) -> dict:
    """One RL step of the pipeline; its stage timings, the total and the completion-token count."""
    result = module.grpo(
        module.rl_context(optimizer), [r["prompt"] for r in records], [r["answer"] for r in records], step
    )
    times = {part: result.timings.get(part, 0.0) for part in PARTS}
    times["total"] = sum(times.values())
    times["tokens"] = float(result.metrics["completions/mean_length"]) * len(records) * module.rl.num_generations
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--G", type=int, default=8, help="completions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coef", type=float, default=0.1, help="CorR-PO lambda")
    parser.add_argument("--measure", default="nuclear", help="rl.inversion.strength.measure")
    parser.add_argument("--projections", default="q,v,o", help="rl.inversion.strength.projections, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = ArithmeticTask().records("train", args.batch * (args.steps + 1))
    strength = {"measure": args.measure, "projections": args.projections.split(",")}
    methods = {
        "grpo": build(args.G, args.seed, {"coef": 0.0, "strength": strength}),
        "corrpo": build(args.G, args.seed, {"coef": args.coef, "strength": strength}),
    }
    totals: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in methods}
    for step in range(args.steps + 1):  # step 0 is the untimed warm-up
        batch = records[step * args.batch : (step + 1) * args.batch]
        order = list(methods) if step % 2 else list(methods)[::-1]  # alternate who goes first
        for name in order:
            module, optimizer = methods[name]
            torch.manual_seed(args.seed * 100003 + step)  # same sampling noise for both methods
            times = rl_step(module, optimizer, batch, step)
            if step:
                for key, value in times.items():
                    totals[name][key].append(value)

    mean = {m: {k: sum(v) / len(v) for k, v in t.items()} for m, t in totals.items()}
    print(
        f"device=cpu threads={torch.get_num_threads()} steps={args.steps} batch={args.batch} G={args.G} "
        f"lambda={args.coef} measure={args.measure} projections={args.projections}\n"
        "model=configs/tiny.yaml model.tiny + model.rl (random init)"
    )
    header = f"{'method':<8}" + "".join(f"{p + ' s':>12}" for p in (*PARTS, "total")) + f"{'tokens':>9}{'ratio':>8}"
    print(header)
    for name in methods:
        row = mean[name]
        ratio = row["total"] / mean["grpo"]["total"]
        print(
            f"{name:<8}"
            + "".join(f"{row[p]:>12.4f}" for p in (*PARTS, "total"))
            + f"{row['tokens']:>9.0f}{ratio:>8.3f}"
        )
    print(f"RESULT corrpo_over_grpo={mean['corrpo']['total'] / mean['grpo']['total']:.4f}")


if __name__ == "__main__":
    main()
