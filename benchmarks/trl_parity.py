"""corrpo's GRPO update against TRL 1.16's own ``GRPOTrainer`` loss, on identical inputs: loss and gradient per update.

Both sides load ONE exported tiny policy folder (configs/tiny.yaml's Qwen2 and character tokenizer) with
``from_pretrained`` and see the same prompts, the same completion tokens, the same rewards (one reward function that
returns fixed values, ``None`` included) and the same weights:

- **TRL**: a real ``trl.GRPOTrainer`` whose ``rollout_func`` hands back the fixed completion tokens; its own
  ``_generate_and_score_completions`` computes the rewards, advantages, old and reference log-probs, and its own
  ``_compute_loss`` the loss, backpropagated; between two iterations a plain SGD step at ``LR``.
- **corrpo**: :class:`corrpo.training.grpo.GRPOStep` (what ``corrpo fit`` runs) on a generator that returns the same
  tokens, with an SGD optimizer at the same constant ``LR`` that records each update's gradient before it steps.

Per setting and update the table prints the loss difference ``|L_corrpo - L_TRL|`` and the gradient difference
relative to the gradient's scale, ``max|g_corrpo - g_TRL| / max|g_TRL|`` over every parameter, and TRL's clip
ratio (``clip_ratio/region_mean``, to show the second iteration's clip is active). The KL reference is the policy
plus the same seeded noise on both sides (:func:`perturb_reference`), so the KL moves the first update too.
Settings: every loss type, each ``scale_rewards``, ``beta`` with and without TRL's bias-corrected KL, two
iterations with clipping active, the top-entropy mask (with and without KL), a row every reward scored ``None``,
each at temperature 0.7 and 1.0.

The prompts have one token length, so neither side pads them: TRL's forward passes no position ids (positions
count from the left pad) where corrpo's derive them from the mask, a difference of padding, not of the loss.
TRL is not a corrpo dependency::

    .venv/bin/python -m uv pip install --python .venv/bin/python -r requirements/cpu.txt -r requirements/trl.txt

Usage: ``python benchmarks/trl_parity.py [--threads 2]``; last line
``RESULT worst_loss=<max |dL|> worst_grad=<max relative dg> settings=<n>``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vs_trl import TRL_COMMON, export_policy, import_trl  # noqa: E402

from corrpo.generation.rollout import Rollout  # noqa: E402
from corrpo.training.config import RLConfig  # noqa: E402
from corrpo.training.grpo import GRPOStep, RLContext  # noqa: E402

LR = 0.5
"""SGD learning rate between two iterations: large enough on the tiny policy that the second iteration's ratios
leave [1 - eps, 1 + eps] (the clip is active)."""
B, G, PROMPT_TOKENS, MAX_NEW = 3, 4, 12, 10


@dataclass(frozen=True)
class Setting:
    """One comparison: the RL keys both sides share (TRL's names where they differ: see :func:`trl_config`)."""

    name: str
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    temperature: float = 1.0
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    num_iterations: int = 1
    top_entropy_quantile: float = 1.0
    none_row: bool = False
    importance_sampling_level: str = "token"
    delta: float | None = None
    entropy_coef: float = 0.0
    sync_ref_steps: int | None = None
    """TRL's ``sync_ref_model`` every this many optimizer steps (``ref_model_mixup_alpha`` 0.6); None = off."""
    batches: int = 1
    sampling: tuple = ()
    """Sampling controls ``((key, value), ...)`` given to both sides (TRL's names): they shape the rollout only, so the
    update must not change (neither side applies them to the loss's log-probs)."""
    """Rollout batches (the same tokens each time): a reference sync shows in the next batch's reference log-probs."""


def settings() -> list[Setting]:
    """Every setting, at temperature 0.7 and 1.0."""
    base = [Setting(f"loss_type={t}", loss_type=t) for t in ("grpo", "dr_grpo", "dapo", "bnpo")]
    base += [Setting(f"scale_rewards={s}", scale_rewards=s) for s in ("batch", "none")]
    base += [
        Setting("beta=0.04", beta=0.04),
        Setting("beta=0.04 bias-corrected KL", beta=0.04, use_bias_correction_kl=True),
        Setting("2 iterations (clip active)", num_iterations=2),
        Setting(
            "2 iterations grpo beta=0.04 bc-KL",
            loss_type="grpo",
            num_iterations=2,
            beta=0.04,
            use_bias_correction_kl=True,
        ),  # fmt: skip
        Setting("top_entropy_quantile=0.5", top_entropy_quantile=0.5),
        Setting("top_entropy_quantile=0.5 beta=0.04", top_entropy_quantile=0.5, beta=0.04),
        Setting("a None reward row", none_row=True),
        Setting("GSPO 2 iterations", loss_type="grpo", importance_sampling_level="sequence", num_iterations=2),
        Setting(
            "GSPO 2 iterations beta=0.04 bc-KL",
            loss_type="grpo",
            importance_sampling_level="sequence",
            num_iterations=2,
            beta=0.04,
            use_bias_correction_kl=True,
        ),  # fmt: skip
        Setting("delta=1.25 2 iterations", delta=1.25, num_iterations=2),
        Setting("sync_ref_model every update, 2 batches", beta=0.04, sync_ref_steps=1, batches=2),
        Setting(
            "sync_ref_model every 2nd update, 2 batches x 2 it.",
            beta=0.04,
            sync_ref_steps=2,
            batches=2,
            num_iterations=2,
        ),  # fmt: skip
        Setting(
            "top_k=5 min_p=0.1 repetition_penalty=1.2",
            sampling=(("top_k", 5), ("min_p", 0.1), ("repetition_penalty", 1.2)),
        ),  # fmt: skip
        Setting("entropy_coef=0.05", entropy_coef=0.05),
        Setting("entropy_coef=0.05 top_entropy_quantile=0.5", entropy_coef=0.05, top_entropy_quantile=0.5),
    ]
    return [replace(s, name=f"{s.name} T={t}", temperature=t) for t in (1.0, 0.7) for s in base]


@dataclass
class Inputs:
    """The shared data: ``B`` prompts x ``G`` completions, prompt-major, and one reward per completion."""

    prompt_ids: list[list[int]]
    """``B`` prompts, ``PROMPT_TOKENS`` tokens each."""
    completion_ids: list[list[int]]
    """``N = B * G`` completions of varied length; those that end in eos stopped, the others are truncated."""
    rewards: list[float | None]


def make_inputs(tokenizer, none_row: bool, seed: int = 0) -> Inputs:
    """Random token ids (no special token inside a completion), varied lengths, some ending in eos."""
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    pick = lambda n: ordinary[torch.randint(len(ordinary), (n,), generator=gen)].tolist()  # noqa: E731
    prompts = [pick(PROMPT_TOKENS) for _ in range(B)]
    completions = []
    for i in range(B * G):
        length = int(torch.randint(3, MAX_NEW + 1, (1,), generator=gen))
        ids = pick(length)
        if i % 3 != 2 and length < MAX_NEW:  # a stopped completion: eos is its last token
            ids[-1] = tokenizer.eos_token_id
        completions.append(ids)
    rewards: list[float | None] = [float(v) for v in torch.randint(0, 3, (B * G,), generator=gen)]
    rewards[1] = 2.5  # no group is constant by accident
    if none_row:
        rewards[5] = None
    return Inputs(prompts, completions, rewards)


def fixed_reward(completion_ids, **kwargs):
    """The reward both sides call: each completion's preset value, found by its token ids (TRL's and corrpo's
    ``completion_ids`` keyword, padding dropped; the random completions are distinct)."""
    return [FIXED[tuple(ids)] for ids in completion_ids]


FIXED: dict[tuple[int, ...], float | None] = {}


def perturb_reference(model) -> None:
    """The KL reference is the policy plus seeded noise (a policy some steps back): with the reference equal to the
    policy, the k3 KL and its gradient are 0 at the first update and the ``beta`` settings would test nothing."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))


def grad_vector(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every update's gradient before it steps (the update's own gradient, after corrpo's
    clip, which the benchmark sets out of reach)."""

    def __init__(self, model, lr: float):
        super().__init__(model.parameters(), lr=lr)
        self.model, self.grads = model, []

    def step(self, closure=None):
        self.grads.append(grad_vector(self.model))
        return super().step(closure)


def corrpo_side(folder: Path, setting: Setting, data: Inputs) -> tuple[list[float], list[dict]]:
    """Each update's loss and gradient through :class:`GRPOStep` (rewards -> advantages -> updates)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    policy = AutoModelForCausalLM.from_pretrained(folder).train()
    ref = None
    if setting.beta > 0:
        ref = AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False)
        perturb_reference(ref)
    rl = RLConfig(
        steps=1, lr=LR, num_generations=G, rewards=["fixed_reward"], loss_type=setting.loss_type,
        scale_rewards=setting.scale_rewards, beta=setting.beta, use_bias_correction_kl=setting.use_bias_correction_kl,
        num_iterations=setting.num_iterations, top_entropy_quantile=setting.top_entropy_quantile,
        importance_sampling_level=setting.importance_sampling_level, delta=setting.delta,
        entropy_coef=setting.entropy_coef, max_grad_norm=0.0,
        sampling={"temperature": setting.temperature, "max_new_tokens": MAX_NEW, **dict(setting.sampling)},
        sync_ref_model=setting.sync_ref_steps is not None, ref_model_mixup_alpha=0.6,
        ref_model_sync_steps=setting.sync_ref_steps or 1,
    )  # fmt: skip
    rollout = to_rollout(data, tokenizer)
    optimizer = RecordingSGD(policy, LR)
    ctx = RLContext(policy=policy, optimizer=optimizer, generate=lambda prompts, g: rollout,
                    decode=lambda r: ["x"] * r.sequences.shape[0], ref_policy=ref)  # fmt: skip
    step = GRPOStep(rl, {"fixed_reward": fixed_reward})
    updates = []
    for batch in range(setting.batches):
        updates += step(ctx, [f"p{b}" for b in range(B)], ["0"] * B, batch).updates
    return [float(u.loss) for u in updates], optimizer.grads


def to_rollout(data: Inputs, tokenizer) -> Rollout:
    """The shared tokens as corrpo's :class:`Rollout`: prompt then completion, padded on the right with pad."""
    N = len(data.completion_ids)
    width = max(len(c) for c in data.completion_ids)
    sequences = torch.full((N, PROMPT_TOKENS + width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(N, width, dtype=torch.bool)
    for i, ids in enumerate(data.completion_ids):
        sequences[i, :PROMPT_TOKENS] = torch.tensor(data.prompt_ids[i // G])
        sequences[i, PROMPT_TOKENS : PROMPT_TOKENS + len(ids)] = torch.tensor(ids)
        completion_mask[i, : len(ids)] = True
    attention_mask = torch.cat([torch.ones(N, PROMPT_TOKENS, dtype=torch.long), completion_mask.long()], dim=1)
    truncated = torch.tensor([ids[-1] != tokenizer.eos_token_id for ids in data.completion_ids])
    return Rollout(sequences, attention_mask, completion_mask, truncated, PROMPT_TOKENS)


def trl_config(trl, setting: Setting, out_dir: Path):
    return trl.GRPOConfig(
        output_dir=str(out_dir), max_steps=1, learning_rate=LR, per_device_train_batch_size=B * G,
        num_generations=G, max_completion_length=MAX_NEW, temperature=setting.temperature, beta=setting.beta,
        loss_type=setting.loss_type, scale_rewards=setting.scale_rewards, num_iterations=setting.num_iterations,
        top_entropy_quantile=setting.top_entropy_quantile, use_bias_correction_kl=setting.use_bias_correction_kl,
        importance_sampling_level=setting.importance_sampling_level, delta=setting.delta,
        entropy_coef=setting.entropy_coef, sync_ref_model=setting.sync_ref_steps is not None,
        ref_model_mixup_alpha=0.6, ref_model_sync_steps=setting.sync_ref_steps or 1, epsilon=0.2, warmup_steps=0,
        max_grad_norm=0.0, **{**TRL_COMMON, **dict(setting.sampling)},
    )  # fmt: skip


def trl_side(folder: Path, setting: Setting, data: Inputs, out_dir: Path) -> tuple[list[float], list[dict], list]:
    """Each update's loss and gradient through TRL's own scoring and loss; an SGD step at ``LR`` between updates."""
    trl = import_trl()
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)

    def rollout_func(prompts, trainer):  # the fixed tokens, one entry per (prompt, completion) pair
        return {
            "prompt_ids": [data.prompt_ids[i // G] for i in range(len(prompts))],
            "completion_ids": [list(c) for c in data.completion_ids],
            "logprobs": [[0.0] * len(c) for c in data.completion_ids],
        }

    dataset = Dataset.from_list([{"prompt": f"p{b}"} for b in range(B)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(
            model=model if setting.beta == 0 else str(folder), reward_funcs=[fixed_reward],
            args=trl_config(trl, setting, out_dir), train_dataset=dataset, processing_class=tokenizer,
            rollout_func=rollout_func,
        )  # fmt: skip
    model = trainer.model.train()
    if trainer.ref_model is not None:
        perturb_reference(trainer.ref_model)
    trainer.current_gradient_accumulation_steps = 1
    inputs = [{"prompt": f"p{i // G}"} for i in range(B * G)]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads, clips = [], [], []
    global_step = 0
    for _ in range(setting.batches):
        batch = trainer._generate_and_score_completions(inputs)
        for _ in range(setting.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            loss = trainer._compute_loss(model, batch)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(grad_vector(model))
            clips.append(trainer._metrics["train"]["clip_ratio/region_mean"][-1])
            optimizer.step()
            global_step += 1  # the Trainer's global_step, then its on_step_end: TRL's SyncRefModelCallback
            if setting.sync_ref_steps is not None and global_step % setting.sync_ref_steps == 0:
                trl.trainer.callbacks.SyncRefModelCallback.sync_target_model(model, trainer.ref_model, 0.6)
    return losses, grads, clips


def relative_grad_gap(ours: dict, theirs: dict) -> float:
    """``max|g_corrpo - g_TRL| / max|g_TRL|`` over every parameter both hold (a missing one is a full gap)."""
    if ours.keys() != theirs.keys():
        return math.inf
    scale = max(float(g.abs().max()) for g in theirs.values())
    gap = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)
    return gap / max(scale, 1e-30)


def compare(folder: Path, setting: Setting, out_dir: Path) -> list[tuple[float, float, float]]:
    """``(|dL|, relative dg, TRL clip ratio)`` per update of ``setting``."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = make_inputs(tokenizer, setting.none_row)
    FIXED.clear()
    FIXED.update({tuple(ids): r for ids, r in zip(data.completion_ids, data.rewards, strict=True)})
    if len(FIXED) != len(data.rewards):
        raise RuntimeError("two random completions are identical: change make_inputs' seed")
    ours_loss, ours_grads = corrpo_side(folder, setting, data)
    trl_loss, trl_grads, clips = trl_side(folder, setting, data, out_dir)
    if len(ours_grads) != len(trl_grads):
        raise RuntimeError(f"{setting.name}: corrpo applied {len(ours_grads)} updates, TRL {len(trl_grads)}")
    return [
        (abs(a - b), relative_grad_gap(g, h), c)
        for a, b, g, h, c in zip(ours_loss, trl_loss, ours_grads, trl_grads, clips, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import_trl()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "policy"
        export_policy(folder)
        print(f"{'setting':<52} {'update':>6} {'|dL|':>10} {'rel dgrad':>10} {'TRL clip':>9}")
        worst_loss = worst_grad = 0.0
        every = settings()
        for setting in every:
            for k, (dl, dg, clip) in enumerate(compare(folder, setting, Path(tmp) / "trl")):
                print(f"{setting.name:<52} {k + 1:>6} {dl:>10.2e} {dg:>10.2e} {clip:>9.3f}")
                worst_loss, worst_grad = max(worst_loss, dl), max(worst_grad, dg)
    print(f"RESULT worst_loss={worst_loss:.3e} worst_grad={worst_grad:.3e} settings={len(every)}")


if __name__ == "__main__":
    main()
