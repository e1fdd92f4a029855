"""corrpo against TRL side by side: seconds per RL step (GRPO) and per SFT step, same policy, prompts and settings.

Both sides start from ONE exported folder (configs/tiny.yaml's tiny Qwen2 and its character tokenizer, saved with
``save_pretrained``) and load it with ``from_pretrained``; both train on the embedded arithmetic task:

- RL: ``--prompts`` prompts x ``--G`` completions, ``--new-tokens`` new tokens at temperature 1, lr 2e-5, the
  accuracy reward (corrpo's ``accuracy_reward``, TRL-style keywords, given to both), dapo loss, no KL, one
  iteration, no gradient checkpointing (TRL's default turns it on). corrpo:
  :class:`corrpo.training.grpo.GRPOStep` (what ``corrpo fit`` runs), TRL: ``GRPOTrainer.train``; a TRL step is
  timed from ``on_step_begin`` to ``on_step_end`` (generation included).
- SFT: batches of ``--sft-batch`` (prompt, completion) traces, completion-only loss, ``max_length`` 128, lr 1e-3.
  corrpo: :func:`corrpo.training.sft.sft_step`; TRL: ``SFTTrainer`` on prompt/completion records.

Runs alternate in rounds (corrpo, TRL, corrpo, TRL, ...), each round ``--steps`` steps after one untimed warm-up
step; each side's figure is its best step over all rounds. Each row also prints its compute-floor fraction
(``benchmarks/compute_floor.py``): SFT over the batches' real tokens, RL over every completion at
``--new-tokens`` (an upper bound of the work, so the RL fractions may read high). The best step of a side is also
its lightest rollout (completions that stop early cost less): repeat the run to see the spread. TRL is not a
corrpo dependency; install it with::

    .venv/bin/python -m uv pip install --python .venv/bin/python -r requirements/cpu.txt -r requirements/trl.txt

Usage: ``python benchmarks/vs_trl.py [--rounds 2 --steps 3 --threads 1]``. The last line is
``RESULT rl_over_trl=<corrpo RL s/step over TRL's> sft_over_trl=<corrpo SFT s/step over TRL's>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from compute_floor import (  # noqa: E402
    best_of,
    decode_flops,
    floor_fraction,
    forward_flops,
    matmul_gflops,
    model_widths,
)

from corrpo.data.arithmetic import ArithmeticTask  # noqa: E402
from corrpo.models.batching import encode_sft_batch  # noqa: E402
from corrpo.models.loading import TinyArchitecture  # noqa: E402
from corrpo.module import CorrPOModule  # noqa: E402
from corrpo.rewards.accuracy import accuracy_reward  # noqa: E402
from corrpo.training.config import RLConfig, SFTConfig  # noqa: E402
from corrpo.training.sft import SFTContext, sft_step  # noqa: E402
from corrpo.training.update import adamw  # noqa: E402

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
INSTALL = "-r requirements/cpu.txt -r requirements/trl.txt"


def import_trl():
    try:
        import trl
    except ImportError:
        sys.exit(
            "benchmarks/vs_trl.py needs TRL (not a corrpo dependency). Install the pinned peer with:\n"
            f"  .venv/bin/python -m uv pip install --python .venv/bin/python {INSTALL}\n"
            "(or .venv/bin/python -m pip install -r requirements/trl.txt)"
        )
    return trl


def export_policy(folder: Path) -> None:
    """configs/tiny.yaml's tiny policy (seed 0) and tokenizer, saved as a Hugging Face folder."""
    model_cfg = yaml.safe_load(TINY_CONFIG.read_text())["model"]
    module = CorrPOModule(policy=model_cfg["policy"], tiny=TinyArchitecture(**model_cfg["tiny"]), seed=0)
    module.policy.save_pretrained(folder)
    module.tokenizer.save_pretrained(folder)


class StepTimer:
    """A transformers TrainerCallback recording each optimizer step's wall time (on_step_begin -> on_step_end): the
    TRL side's clock, since TRL's own loop runs its steps (corrpo's side times its steps with ``best_of``)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def corrpo_rl(folder: Path, args, records: list[dict]) -> float:
    """corrpo's best RL step (:func:`compute_floor.best_of`: batch 0 the untimed warm-up, then ``--steps`` timed)."""
    rl = RLConfig(
        steps=args.steps + 1, lr=2e-5, num_generations=args.G, rewards=["accuracy"], reward_weights=[1.0],
        loss_type="dapo", scale_rewards="group", sampling={"temperature": 1.0, "max_new_tokens": args.new_tokens},
    )  # fmt: skip
    module = CorrPOModule(policy=str(folder), rl=rl, seed=0)
    optimizer = adamw(module.policy.parameters(), rl.lr, 0.0)
    ctx = module.rl_context(optimizer)
    steps = iter(range(args.steps + 1))

    def rl_step() -> None:
        step = next(steps)
        batch = records[step * args.prompts : (step + 1) * args.prompts]
        module.grpo(ctx, [r["prompt"] for r in batch], [r["answer"] for r in batch], step)

    return best_of(rl_step, args.steps)[0]


# the same on both TRL sides: CPU, no logging or saving, constant lr, data in order, and no gradient checkpointing
# (TRL's configs default it on; corrpo's is off: the same setting on both sides)
TRL_COMMON = dict(
    use_cpu=True, report_to=[], logging_steps=1000, save_strategy="no", lr_scheduler_type="constant", seed=0,
    dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False, shuffle_dataset=False,
    gradient_checkpointing=False,
)  # fmt: skip


def trl_peer(folder: Path):
    """TRL, ``datasets.Dataset`` and the exported policy and tokenizer loaded with ``from_pretrained``."""
    trl = import_trl()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return trl, Dataset, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


def trl_rl(folder: Path, args, records: list[dict], out_dir: Path) -> float:
    """TRL's best RL step after its first (untimed: the warm-up), as :class:`StepTimer` records them."""
    trl, Dataset, tokenizer, model = trl_peer(folder)
    config = trl.GRPOConfig(
        output_dir=str(out_dir), max_steps=args.steps + 1, learning_rate=2e-5,
        per_device_train_batch_size=args.prompts * args.G, num_generations=args.G,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
        scale_rewards="group", num_iterations=1, warmup_steps=0, **TRL_COMMON,
    )  # fmt: skip
    timer = StepTimer()
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in records])
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=[accuracy_reward], args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[timer],
    )  # fmt: skip
    trainer.train()
    return min(timer.times[1:])


def corrpo_sft(folder: Path, args, records: list[dict]) -> float:
    """corrpo's best SFT step (:func:`compute_floor.best_of`: batch 0 the untimed warm-up, then ``--steps``)."""
    sft = SFTConfig(steps=args.steps + 1, lr=1e-3, max_length=128)
    module = CorrPOModule(policy=str(folder), sft=sft, seed=0)
    optimizer = adamw(module.policy.parameters(), sft.lr, 0.0)
    module.policy.train()
    steps = iter(range(args.steps + 1))

    def train_step() -> None:
        step = next(steps)
        batch = records[step * args.sft_batch : (step + 1) * args.sft_batch]
        sft_step(SFTContext(module.policy, module.tokenizer, optimizer), sft, [r["prompt"] for r in batch],
                 [r["completion"] for r in batch], step)  # fmt: skip

    return best_of(train_step, args.steps)[0]


def trl_sft(folder: Path, args, records: list[dict], out_dir: Path) -> float:
    """TRL's best SFT step after its first (untimed: the warm-up), as :class:`StepTimer` records them."""
    trl, Dataset, tokenizer, model = trl_peer(folder)
    config = trl.SFTConfig(
        output_dir=str(out_dir), max_steps=args.steps + 1, learning_rate=1e-3,
        per_device_train_batch_size=args.sft_batch, max_length=128, completion_only_loss=True, packing=False,
        **TRL_COMMON,
    )  # fmt: skip
    timer = StepTimer()
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[timer])  # fmt: skip
    trainer.train()
    return min(timer.times[1:])


def _sft_lengths(tokenizer, records: list[dict]) -> list[int]:
    """The tokens each SFT record trains on: prompt + completion + eos, cut at 128 (both sides' max_length)."""
    enc = encode_sft_batch(tokenizer, [r["prompt"] for r in records], [r["completion"] for r in records], 128)
    return enc["attention_mask"].sum(1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sft-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1 (one untimed warm-up step runs before them)")
    import_trl()  # fail before any work when the peer is missing
    torch.set_num_threads(args.threads)
    task = ArithmeticTask()
    rl_records = task.records("train", args.prompts * (args.steps + 1))
    sft_records = task.records("train", args.sft_batch * (args.steps + 1))
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "policy"
        export_policy(folder)
        for round_ in range(args.rounds):
            sides = [
                ("rl/corrpo", lambda: corrpo_rl(folder, args, rl_records)),
                ("rl/trl", lambda r=round_: trl_rl(folder, args, rl_records, Path(tmp) / f"trl-rl-{r}")),
                ("sft/corrpo", lambda: corrpo_sft(folder, args, sft_records)),
                ("sft/trl", lambda r=round_: trl_sft(folder, args, sft_records, Path(tmp) / f"trl-sft-{r}")),
            ]
            if round_ % 2:  # alternate who goes first
                sides = [sides[1], sides[0], sides[3], sides[2]]
            for name, run in sides:
                best[name] = min(best.get(name, float("inf")), run())
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(folder)
        folder_tokenizer = AutoTokenizer.from_pretrained(folder)
    gflops = matmul_gflops(config.hidden_size, model_widths(config))
    rows = args.prompts * args.G
    rl_flops = decode_flops(config, rows, 24, args.new_tokens) + 3 * forward_flops(
        config, rows, 24 + args.new_tokens, args.new_tokens
    )
    # SFT: the real tokens of the timed batches (their mean); RL: every completion at --new-tokens, an upper bound
    # of the work (completions that stop early cost less), so the RL fractions can read above the truth
    lengths = _sft_lengths(folder_tokenizer, sft_records)
    sft_flops = 3 * sum(forward_flops(config, 1, n) for n in lengths) * args.sft_batch / len(lengths)
    print(
        f"cpu threads={args.threads} rounds={args.rounds} x {args.steps} steps (best step shown); RL {args.prompts} "
        f"prompts x G={args.G}, {args.new_tokens} new tokens; SFT batch {args.sft_batch}; matmul {gflops:.0f} GFLOP/s"
    )
    print(f"{'phase':<5} {'corrpo s':>9} {'trl s':>9} {'ratio':>7} {'corrpo fl':>10} {'trl fl':>7}")
    for phase, flops in (("rl", rl_flops), ("sft", sft_flops)):
        ours, theirs = best[f"{phase}/corrpo"], best[f"{phase}/trl"]
        print(
            f"{phase:<5} {ours:>9.3f} {theirs:>9.3f} {ours / theirs:>7.3f} "
            f"{floor_fraction(flops, gflops, ours):>10.3f} {floor_fraction(flops, gflops, theirs):>7.3f}"
        )
    rl_ratio, sft_ratio = best["rl/corrpo"] / best["rl/trl"], best["sft/corrpo"] / best["sft/trl"]
    print(f"RESULT rl_over_trl={rl_ratio:.4f} sft_over_trl={sft_ratio:.4f}")


if __name__ == "__main__":
    main()
