"""Time one RL step of plain GRPO and of CorR-PO (same config, same run), part by part, and how the CorR-PO term
scales with completion length and model width.

Both sides run :class:`corrpo.training.grpo.GRPOStep`, the very code ``corrpo fit`` runs, and read its
per-stage timings: (a) ``generate``: G samples per prompt, (b) ``score``: task rewards, (c) CorR-PO only:
``inversion``, the reward term (its onepass scoring over all ``B * G`` responses; none when it shares the
update's forward, see ``rl.inversion.shared_forward``), (d) ``update``: forward, clipped loss, backward, AdamW
step. The two methods run on two modules built from the same seed and are interleaved step by step (alternating
who goes first), so machine load hits both alike; one untimed warm-up step each comes first, and each side's
figure is the mean over ``--steps`` steps of each step's best of ``--repeats`` runs. Every run starts both sides
from the same weights (the initial policy, AdamW state cleared) and sampling seed, so both decode the same rollout
and the two figures differ by the CorR-PO term alone (without this the sides' policies drift apart after step 1
and each side's best step is its lightest rollout: ``--diverge`` lets them train on and shows best step over
best step). Usage::

    python benchmarks/rl_step.py --steps 10 --batch 8 --G 8 [--projections q k v o] [--threads 1]
    python benchmarks/rl_step.py --scaling --lengths 64 128 256 512 --hidden 128 256 512 --projections q k v o

``--scaling`` times, on a synthetic rollout (random tokens, ``--batch x --G`` rows of a 16-token prompt and
``L`` completion tokens) for each ``--hidden`` width and ``--lengths`` L, against the update it rides on (best
of ``--repeats`` after a warm-up): ``bonus``, the CorR-PO term as a separate scoring pass, and ``shared``, what
the term adds to the update when it is scored on the update's own forward (the default where exact), and
``eigen``, the term's eigen-solves alone (W_k's nuclear norm: one per token, timed on its own matrices by
``compute_floor.timed_eigen_solves``): with LAPACK's solver no exact term costs less. Every row prints its
compute-floor fraction (``benchmarks/compute_floor.py``). The step table prints the same eigen-solve share of
CorR-PO's step when W_k is scored, and what the term adds to GRPO's update (CorR-PO's ``inversion`` + ``update``
less GRPO's ``update``) split by its big calls (``compute_floor.timed_calls``): ``torch.autograd.grad`` (its
backward from the chosen logits to the last layer), ``torch.linalg.qr`` (V's measure) and the eigen-solves,
against the 0.1 of GRPO's step that 1.1x allows.

The last line is ``RESULT corrpo_over_grpo=<CorR-PO's seconds over GRPO's>`` (plus, with ``--scaling``,
``bonus_over_update_h512_T256=<x> shared_over_update_h512_T256=<y> eigen_over_update_h512_T256=<z>``, or the
widest, longest cell when that one was not measured).
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
import yaml  # noqa: E402
from compute_floor import (  # noqa: E402
    EIGEN_SOLVERS,
    best_of,
    decode_flops,
    eigen_seconds_of,
    floor_fraction,
    forward_flops,
    matmul_gflops,
    model_widths,
    timed_calls,
)

from corrpo.data.arithmetic import ArithmeticTask  # noqa: E402
from corrpo.generation.rollout import Rollout  # noqa: E402
from corrpo.models.loading import TinyArchitecture  # noqa: E402
from corrpo.module import CorrPOModule  # noqa: E402
from corrpo.training.config import RLConfig  # noqa: E402
from corrpo.training.corrpo_term import corrpo_term, corrpo_term_on_update_forward  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PARTS = ("generate", "score", "inversion", "update")
TERM_CALLS = {
    **EIGEN_SOLVERS,
    "backward": [(torch.autograd, "grad")],  # the term's backward to the last layer (the update uses .backward())
    "qr": [(torch.linalg, "qr")],
}
"""The CorR-PO term's big calls, timed in every step (``compute_floor.timed_calls``)."""


def build(
    G: int,
    seed: int,
    inversion: dict,
    hidden: int | None = None,
    max_new_tokens: int | None = None,
    vocab: int | None = None,
) -> tuple[CorrPOModule, torch.optim.Optimizer]:
    """The model and RL settings of configs/tiny.yaml itself (so the benchmark cannot drift from the default),
    with ``G`` completions per prompt, the CorR-PO term ``inversion`` (``coef 0`` = plain GRPO), and optionally
    another width (``hidden``; MLP 3x, the default's ratio), completion cap or vocabulary size (``vocab``, e.g. a
    real model's 151,936 for Qwen2.5: the unembedding's share of the work)."""
    model_cfg = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    rl_cfg = {**model_cfg["rl"], "num_generations": G, "inversion": inversion}
    if max_new_tokens:
        rl_cfg["sampling"] = {**rl_cfg["sampling"], "max_new_tokens": max_new_tokens}
    tiny = TinyArchitecture(**model_cfg["tiny"])
    if hidden:
        tiny = replace(tiny, hidden_size=hidden, intermediate_size=3 * hidden, max_position_embeddings=1024)
    module = CorrPOModule(policy=model_cfg["policy"], tiny=tiny, rl=RLConfig(**rl_cfg), seed=seed)
    if vocab:
        module.policy.resize_token_embeddings(vocab)
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=module.rl.lr)
    return module, optimizer


def rl_step(module: CorrPOModule, optimizer: torch.optim.Optimizer, records: list[dict], step: int) -> dict:
    """One RL step of the pipeline; its stage timings, the total, the completion-token count and the seconds of the
    CorR-PO term's big calls (:data:`TERM_CALLS`; ``eigen``: the measures' LAPACK eigen-solves)."""
    with timed_calls(TERM_CALLS) as spent:
        result = module.grpo(
            module.rl_context(optimizer), [r["prompt"] for r in records], [r["answer"] for r in records], step
        )
    times = {part: result.timings.get(part, 0.0) for part in PARTS}
    times["total"] = sum(times.values())
    times.update({name: record["seconds"] for name, record in spent.items()})
    times["tokens"] = float(result.metrics["completions/mean_length"]) * len(records) * module.rl.num_generations
    return times


def step_table(args, strength: dict, gflops: float) -> float:
    """The step-by-step GRPO vs CorR-PO table; returns CorR-PO's total over GRPO's: each step's best of
    ``--repeats`` (both sides decode the same rollout), summed over the steps; with ``--diverge``, best step over
    best step."""
    records = ArithmeticTask().records("train", args.batch * (args.steps + 1))
    methods = {
        "grpo": build(args.G, args.seed, {"coef": 0.0, "strength": strength}),
        "corrpo": build(
            args.G, args.seed, {"coef": args.coef, "strength": strength, "shared_forward": not args.separate_pass}
        ),
    }
    start = {k: v.clone() for k, v in methods["grpo"][0].policy.state_dict().items()}
    steps: dict[str, list[dict]] = defaultdict(list)
    for step in range(args.steps + 1):  # step 0 is the untimed warm-up
        batch = records[step * args.batch : (step + 1) * args.batch]
        best_here: dict[str, dict] = {}
        for repeat in range(1 if args.diverge or not step else args.repeats):
            order = list(methods) if (step + repeat) % 2 else list(methods)[::-1]  # alternate who goes first
            for name in order:
                module, optimizer = methods[name]
                if not args.diverge:  # the same weights and noise: both sides decode the same rollout
                    module.policy.load_state_dict(start)
                    optimizer.state.clear()
                torch.manual_seed(args.seed * 100003 + step)  # same sampling noise for both methods
                times = rl_step(module, optimizer, batch, step)
                if name not in best_here or times["total"] < best_here[name]["total"]:
                    best_here[name] = times
        if step:
            for name, times in best_here.items():
                steps[name].append(times)
    if args.diverge:
        best = {m: min(rows, key=lambda r: r["total"]) for m, rows in steps.items()}
        shown = "best step shown"
    else:
        best = {m: {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} for m, rows in steps.items()}
        shown = f"mean over the steps of each step's best of {args.repeats}"
    config = methods["grpo"][0].policy.config
    print(
        f"device=cpu threads={torch.get_num_threads()} steps={args.steps} ({shown}) batch={args.batch} "
        f"G={args.G} lambda={args.coef} measure={args.measure} projections={','.join(args.projections)}\n"
        f"model=configs/tiny.yaml model.tiny + model.rl (random init); matmul rate now {gflops:.0f} GFLOP/s; "
        "floor = generate + update FLOPs over that rate, as a fraction of the step"
    )
    header = (
        f"{'method':<8}" + "".join(f"{p + ' s':>12}" for p in (*PARTS, "total")) + f"{'tokens':>9}{'ratio':>8}"
        f"{'floor':>7}"
    )
    print(header)
    rows = args.batch * args.G
    prompt_len = 24
    for name in methods:
        row = best[name]
        new = max(1, round(row["tokens"] / rows))  # mean completion length
        flops = decode_flops(config, rows, prompt_len, new) + 3 * forward_flops(config, rows, prompt_len + new, new)
        print(
            f"{name:<8}"
            + "".join(f"{row[p]:>12.4f}" for p in (*PARTS, "total"))
            + f"{row['tokens']:>9.0f}{row['total'] / best['grpo']['total']:>8.3f}"
            + f"{floor_fraction(flops, gflops, row['total']):>7.3f}"
        )
    pairs = list(zip(steps["corrpo"], steps["grpo"], strict=True))
    ratios = sorted(c["total"] / g["total"] for c, g in pairs)
    same = sum(c["tokens"] == g["tokens"] for c, g in pairs)
    print(
        f"per-step ratios: median {ratios[len(ratios) // 2]:.3f}, min {ratios[0]:.3f}, max {ratios[-1]:.3f}; "
        f"{same} of {len(pairs)} steps had the same completion tokens on both sides"
    )
    corrpo, grpo = best["corrpo"], best["grpo"]
    eigen = corrpo["eigen"]
    if eigen > 0:  # W_k's nuclear norm: one eigen-solve per token, at least min(S, d_kv, d)-square
        share = eigen / grpo["total"]
        print(
            f"eigen-solves in CorR-PO's step: {eigen:.4f} s = {share:.3f} of GRPO's step: "
            f"with this solver the ratio is at least {1 + share:.3f} were all other work free"
        )
    term = corrpo["inversion"] + corrpo["update"] - grpo["update"]
    split = {name: corrpo[name] for name in TERM_CALLS}
    split["the rest"] = term - sum(split.values())
    print(
        f"the term over GRPO's update: {term:.4f} s (CorR-PO's inversion + update - GRPO's update): "
        + ", ".join(f"{name} {secs:.4f} s" for name, secs in split.items())
        + f"; 1.1x allows {0.1 * grpo['total']:.4f} s for all CorR-PO adds"
    )
    return corrpo["total"] / grpo["total"]


def synthetic_rollout(vocab: int, rows: int, prompt_len: int, length: int, seed: int) -> Rollout:
    """``rows`` random sequences: a ``prompt_len`` prompt then ``length`` completion tokens, all real."""
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.randint(4, vocab, (rows, prompt_len + length), generator=gen)
    return Rollout(
        sequences=sequences,
        attention_mask=torch.ones_like(sequences),
        completion_mask=torch.ones(rows, length, dtype=torch.bool),
        truncated=torch.ones(rows, dtype=torch.bool),
        prompt_length=prompt_len,
    )


def scaling_table(args, strength: dict) -> dict[str, float]:
    """Bonus (a separate scoring pass) over update, per width and completion length, on synthetic rollouts."""
    rows, prompt_len = args.batch * args.G, 16
    print(
        f"\nscaling: {rows} rows of {prompt_len} prompt + L completion tokens, projections "
        f"{','.join(args.projections)}, best of {args.repeats} after a warm-up"
    )
    header = (
        f"{'hidden':>6} {'L':>5} {'bonus s':>9} {'update s':>9} {'bonus/upd':>10} {'shared/upd':>11} "
        f"{'eigen/upd':>10} {'bonus fl':>9} {'upd fl':>7}"
    )
    print(header)
    out = {}
    for hidden in args.hidden:
        inversion = {"coef": args.coef, "strength": strength}
        module, optimizer = build(args.G, args.seed, inversion, hidden, 1024, args.vocab)
        config = module.policy.config
        gflops = matmul_gflops(config.hidden_size, model_widths(config))
        ctx = module.rl_context(optimizer)
        for length in args.lengths:
            rollout = synthetic_rollout(config.vocab_size, rows, prompt_len, length, args.seed)
            advantages = torch.randn(rows)
            term = lambda m=module, r=rollout: corrpo_term(m.policy, r, m.rl.inversion, 10, args.G, rows)  # noqa: E731
            bonus, _ = best_of(term, args.repeats)
            update, _ = best_of(
                lambda m=module, c=ctx, r=rollout, a=advantages: m.grpo.update(c, r, a, 0), args.repeats
            )

            def shared_then_update(m=module, c=ctx, r=rollout, a=advantages):
                _, first = corrpo_term_on_update_forward(m.policy, r, m.rl.inversion, 10, args.G)
                m.grpo.update(c, r, a, 0, first)

            shared = best_of(shared_then_update, args.repeats)[0] - update  # what the term adds to the update
            eigen = eigen_seconds_of(term, args.repeats)  # the term's eigen-solves alone (W_k's: one per token)
            seq = prompt_len + length
            bonus_flops = forward_flops(config, rows, seq, length) + 2 * forward_flops(config, rows, seq, 0, layers=1)
            update_flops = 3 * forward_flops(config, rows, seq, length)
            out[f"bonus_over_update_h{hidden}_T{length}"] = bonus / update
            out[f"shared_over_update_h{hidden}_T{length}"] = shared / update
            out[f"eigen_over_update_h{hidden}_T{length}"] = eigen / update
            print(
                f"{hidden:>6} {length:>5} {bonus:>9.3f} {update:>9.3f} {bonus / update:>10.2f} "
                f"{shared / update:>11.2f} {eigen / update:>10.2f} "
                f"{floor_fraction(bonus_flops, gflops, bonus):>9.3f} "
                f"{floor_fraction(update_flops, gflops, update):>7.3f}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (best one counts)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--G", type=int, default=8, help="completions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coef", type=float, default=0.1, help="CorR-PO lambda")
    parser.add_argument("--measure", default="nuclear", help="rl.inversion.strength.measure")
    parser.add_argument("--projections", nargs="+", default=["q", "v", "o"], help="rl.inversion.strength.projections")
    parser.add_argument("--scaling", action="store_true", help="also the bonus-over-update table (synthetic rollouts)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="--scaling: L")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512], help="--scaling: model widths")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many per step / --scaling cell")
    parser.add_argument("--skip-steps", action="store_true", help="only the --scaling table")
    parser.add_argument("--vocab", type=int, default=0, help="--scaling: resize the vocabulary (0: the tiny one)")
    parser.add_argument(
        "--separate-pass",
        action="store_true",
        help="score the CorR-PO term in its own pass (rl.inversion.shared_forward false)",
    )
    parser.add_argument(
        "--diverge",
        action="store_true",
        help="let each side train on (not restart every step from the same weights; rollouts then differ)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    strength = {"measure": args.measure, "projections": list(args.projections)}
    results = {}
    if not args.skip_steps:
        config = build(args.G, args.seed, {"coef": 0.0})[0].policy.config
        results["corrpo_over_grpo"] = step_table(
            args, strength, matmul_gflops(config.hidden_size, model_widths(config))
        )
    if args.scaling or args.skip_steps:
        results.update(scaling_table(args, strength))
    last = {k: v for k, v in results.items() if "_over_update_" not in k}
    if any("_over_update_" in k for k in results):  # the cell (hidden 512, 256 tokens) when measured
        cell = "h512_T256" if "bonus_over_update_h512_T256" in results else f"h{max(args.hidden)}_T{max(args.lengths)}"
        kinds = ("bonus", "shared", "eigen")
        last.update({f"{kind}_over_update_{cell}": results[f"{kind}_over_update_{cell}"] for kind in kinds})
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in last.items()))


if __name__ == "__main__":
    main()
