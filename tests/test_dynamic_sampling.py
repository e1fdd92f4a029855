"""DAPO dynamic sampling (``rl.dynamic_sampling``): the group filter against verl's, a batch filled with varied
groups from more rounds, the bound on rounds, the data module's extra prompts, and exact resume."""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARCH, run_tiny

from corrpo.data.arithmetic import ArithmeticTask
from corrpo.data.datamodule import ReasoningDataModule, shard_batch
from corrpo.generation.rollout import SamplingConfig
from corrpo.module import CorrPOModule
from corrpo.training.config import RLConfig
from corrpo.training.dynamic_sampling import DynamicSamplingExhausted
from corrpo.training.forward import completion_log_probs
from corrpo.training.group_filter import resolve_metric, varied_groups
from corrpo.training.grpo import GRPOStep
from corrpo.training.objectives import zero_std_fraction
from corrpo.training.sampled_groups import join_groups

G = 4


# ----------------------------------------------------------------------------------------------- the filter
def verl_kept_trajectories(uids: list[str], metric_vals: np.ndarray) -> list[int]:
    """verl's ``filter_groups`` selection, transcribed line for line from the inline loop of
    ``recipe/dapo/dapo_ray_trainer.py`` ``RayDAPOTrainer.fit()`` (volcengine/verl; there is no function to import)."""
    prompt_uid2metric_vals = defaultdict(list)
    for uid, metric_val in zip(uids, metric_vals, strict=True):
        prompt_uid2metric_vals[uid].append(metric_val)
    prompt_uid2metric_std = {}
    for prompt_uid, vals in prompt_uid2metric_vals.items():
        prompt_uid2metric_std[prompt_uid] = np.std(vals)
    kept_prompt_uids = [
        uid for uid, std in prompt_uid2metric_std.items() if std > 0 or len(prompt_uid2metric_vals[uid]) == 1
    ]
    return [idx for idx, traj_from_prompt_uid in enumerate(uids) if traj_from_prompt_uid in kept_prompt_uids]


VERL_KEEP_RULE = "if std > 0 or len(prompt_uid2metric_vals[uid]) == 1"


def test_the_group_filter_keeps_the_trajectories_verls_filter_groups_keeps():
    generator = torch.Generator().manual_seed(0)
    kept_and_dropped = set()
    for _ in range(200):
        B = int(torch.randint(1, 9, (), generator=generator))
        # verl's "acc" / 0-1 scores and a few levels (dyadic, so np.std of equal values is exactly 0 in both)
        values = torch.randint(-1, 3, (B * G,), generator=generator).float() / 2
        uids = [f"prompt-{b}" for b in range(B) for _ in range(G)]
        keep = varied_groups(values, G)
        ours = [i for i in range(B * G) if keep[i // G]]
        assert ours == verl_kept_trajectories(uids, values.double().numpy())
        kept_and_dropped.update(keep.tolist())
        assert zero_std_fraction(values, G) == pytest.approx(1 - keep.float().mean().item())
    assert kept_and_dropped == {True, False}


def test_the_transcription_is_the_filter_of_the_installed_verl():
    verl = pytest.importorskip("verl")
    roots = [Path(verl.__file__).parent]
    try:  # verl's DAPO recipe ships as the top-level ``recipe`` package in some wheels
        spec = importlib.util.find_spec("recipe.dapo")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).parent)
    texts = [" ".join(p.read_text(errors="ignore").split()) for root in roots for p in root.rglob("*.py")]
    loops = [t for t in texts if "filter_groups" in t and "prompt_uid2metric_std" in t]
    if not loops:
        pytest.skip(f"verl {getattr(verl, '__version__', '?')} ships no filter_groups loop (its DAPO recipe is apart)")
    assert any(VERL_KEEP_RULE in t and "np.std(metric_vals)" in t for t in loops)


def test_a_group_needs_two_scored_values_that_differ():
    nan = float("nan")
    values = torch.tensor([[1, nan, nan, nan], [1, 0, nan, nan], [nan] * 4, [2, 2, 2, 2], [0.1, 0.1, 0.1, 0.2]])
    assert varied_groups(values.flatten(), G).tolist() == [False, True, False, False, True]
    # equal values are constant exactly, where np.std of equal non-dyadic floats rounds above 0
    assert not varied_groups(torch.full((3,), 0.1, dtype=torch.float64), 3).item() and np.std([0.1] * 3) > 0


def test_the_metric_takes_verls_names_and_a_wrong_setting_names_its_key():
    names = ["accuracy", "format"]
    assert {resolve_metric(m, names) for m in ("reward", "seq_reward", "score")} == {"reward"}
    assert resolve_metric("acc", names) == "accuracy" and resolve_metric("format", names) == "format"
    with pytest.raises(ValueError, match=r"rl.dynamic_sampling.metric='acc' is neither .* 'reward', 'format'"):
        resolve_metric("acc", ["format"])
    with pytest.raises(ValueError, match="in-reward KL penalty"):
        resolve_metric("seq_final_reward", names)
    with pytest.raises(ValueError, match="rl.dynamic_sampling.max_num_gen_batches must be an integer"):
        RLConfig(dynamic_sampling={"max_num_gen_batches": 2.5})
    with pytest.raises(ValueError, match="rl.dynamic_sampling.metric='inversion'"):
        GRPOStep(RLConfig(dynamic_sampling={"enable": True, "metric": "inversion"}), {"accuracy": None})


# ------------------------------------------------------------------------------------------ filling a batch
RECORDS = ArithmeticTask().records("train", 6)
A, B, C, D, E, F = ([r["prompt"], r["answer"]] for r in RECORDS)


def scripted_reward(solved: set[str]):
    """1 for every sample of a ``solved`` prompt (a constant group), else distinct per group member."""

    def reward(prompts, completions, **kwargs):
        pairs = enumerate(zip(prompts, completions, strict=True))
        return [1.0 if p in solved else (i % G) / 1000 + len(c) / 100 for i, (p, c) in pairs]

    return reward


class Rounds:
    """``more_prompts``: hands out the given batches in order and counts them."""

    def __init__(self, *batches: list) -> None:
        self.batches, self.drawn = list(batches), 0

    def __call__(self) -> dict:
        records = self.batches[self.drawn]
        self.drawn += 1
        return {"prompt": [p for p, _ in records], "answer": [a for _, a in records], "columns": {}}


def dynamic_step(solved: set[str], rounds: Rounds, enable: bool = True, max_num_gen_batches: int = 10):
    rl = RLConfig(
        steps=3, lr=1e-3, num_generations=G, sampling=SamplingConfig(max_new_tokens=8),
        dynamic_sampling={"enable": enable, "max_num_gen_batches": max_num_gen_batches},
    )  # fmt: skip
    module = CorrPOModule(policy="tiny-qwen2", tiny=TINY_ARCH, rl=rl, seed=0)
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=rl.lr, weight_decay=0.0)
    ctx = replace(module.rl_context(optimizer), more_prompts=rounds, pad_token_id=module.tokenizer.pad_token_id)
    step = GRPOStep(rl, {"task": scripted_reward(solved)})
    return module, step, ctx


def run_step(step: GRPOStep, ctx, *records):
    torch.manual_seed(0)
    return step(ctx, [p for p, _ in records], [a for _, a in records], rl_index=0)


def prompts_trained_on(result) -> list[str]:
    return [row["prompt"] for row in result.completions[::G]]


def test_dynamic_sampling_fills_the_batch_with_varied_groups_from_more_rounds(one_thread):
    rounds = Rounds([C, D], [E, F])
    _, step, ctx = dynamic_step({A[0], C[0]}, rounds)
    result = run_step(step, ctx, A, B)
    assert rounds.drawn == 1 and prompts_trained_on(result) == [B[0], D[0]]  # A and C dropped, B and D kept
    assert result.metrics["dynamic_sampling/generation_rounds"] == 2
    assert result.metrics["dynamic_sampling/kept_groups"] == 2
    assert result.metrics["dynamic_sampling/dropped_groups"] == 2
    assert result.metrics["frac_reward_zero_std"] == 0 and result.rewards.shape == (2 * G,)
    assert result.advantages.view(-1, G).abs().sum(1).min() > 0 and [u.applied for u in result.updates] == [True]


def test_varied_groups_past_the_batch_size_are_dropped_in_round_order(one_thread):
    rounds = Rounds([D, E])
    _, step, ctx = dynamic_step({A[0]}, rounds)
    result = run_step(step, ctx, A, B)
    assert prompts_trained_on(result) == [B[0], D[0]]  # verl's batch[:traj_bsz]: E is past it
    assert result.metrics["dynamic_sampling/kept_groups"] == 3 and result.rewards.shape == (2 * G,)


def test_with_every_group_varied_dynamic_sampling_is_the_plain_step(one_thread):
    rounds = Rounds()
    on, step_on, ctx_on = dynamic_step(set(), rounds)
    off, step_off, ctx_off = dynamic_step(set(), Rounds(), enable=False)
    result = run_step(step_on, ctx_on, A, B)
    run_step(step_off, ctx_off, A, B)
    assert rounds.drawn == 0 and result.metrics["dynamic_sampling/generation_rounds"] == 1
    for a, b in zip(on.policy.parameters(), off.policy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_batch_still_short_after_max_num_gen_batches_rounds_stops_the_run_as_verl_does(one_thread):
    rounds = Rounds(*[[C, D]] * 5)
    _, step, ctx = dynamic_step({A[0], B[0], C[0], D[0]}, rounds, max_num_gen_batches=3)
    with pytest.raises(DynamicSamplingExhausted, match=r"after 3 generation rounds \(rl.dynamic_sampling.max_num_gen_"
                       r"batches=3\) the batch holds 0 of its 2 groups"):  # fmt: skip
        run_step(step, ctx, A, B)
    assert rounds.drawn == 2  # the step's own batch is the first round
    _, step, ctx = dynamic_step({A[0]}, Rounds(), max_num_gen_batches=3)
    with pytest.raises(ValueError, match="rl.dynamic_sampling.enable needs more prompts"):
        run_step(step, replace(ctx, more_prompts=None), A, B)


def test_max_num_gen_batches_0_samples_until_the_batch_is_full(one_thread):
    rounds = Rounds(*[[C, D]] * 11, [E, F])
    _, step, ctx = dynamic_step({A[0], B[0], C[0], D[0]}, rounds, max_num_gen_batches=0)
    result = run_step(step, ctx, A, B)
    assert rounds.drawn == 12 and result.metrics["dynamic_sampling/generation_rounds"] == 13
    assert prompts_trained_on(result) == [E[0], F[0]]


def test_joining_rounds_of_different_prompt_widths_changes_no_log_prob(one_thread):
    short, long = min(RECORDS, key=lambda r: len(r["prompt"])), max(RECORDS, key=lambda r: len(r["prompt"]))
    module, step, ctx = dynamic_step(set(), Rounds())
    parts = [step.sample(ctx, [r["prompt"]], [r["answer"]], None, None, {}) for r in (short, long)]
    assert parts[0].rollout.prompt_length < parts[1].rollout.prompt_length
    joined = join_groups(parts, module.tokenizer.pad_token_id)
    assert joined.n_groups == 2 and joined.inputs.prompts == [short["prompt"]] * G + [long["prompt"]] * G
    for packed in (False, True):
        together = completion_log_probs(module.policy, joined.rollout, packed=packed)[0]
        for rows, part in zip((slice(0, G), slice(G, 2 * G)), parts, strict=True):
            alone = completion_log_probs(module.policy, part.rollout, packed=packed)[0]
            mask, width = joined.rollout.completion_mask[rows], alone.shape[1]
            assert torch.equal(mask[:, :width], part.rollout.completion_mask) and not mask[:, width:].any()
            assert torch.allclose(together[rows, :width] * mask[:, :width], alone * mask[:, :width], atol=1e-5)


# ----------------------------------------------------------------------------------- the data module's rounds
def small_data() -> ReasoningDataModule:
    return ReasoningDataModule(n_train=100, sft_steps=0, rl_steps=3, rl_batch_size=4, n_probe=5, n_test=7)


def test_the_data_module_hands_out_extra_rounds_apart_from_the_steps_and_checkpoints_their_count():
    data = small_data()
    steps_before = [data.step_batches()[i] for i in range(3)]
    first, second = data.next_rl_round(), data.next_rl_round()
    assert len(first["prompt"]) == 4 and first["prompt"] != second["prompt"] and "step" not in first
    assert first["prompt"] != steps_before[0]["prompt"]  # salted apart from the steps' stream
    assert [data.step_batches()[i] for i in range(3)] == steps_before  # a step's batch is a function of its index
    assert data.state_dict() == {"rl_rounds_drawn": 2} and small_data().state_dict() == {}  # none drawn: none saved
    resumed = small_data()
    resumed.load_state_dict(data.state_dict())
    assert resumed.next_rl_round() == data.next_rl_round()  # both draw round 3
    whole = data.step_batches().extra_rl_round(5)
    shares = [shard_batch(whole, rank, 2) for rank in range(2)]
    assert shares[0]["prompt"] + shares[1]["prompt"] == whole["prompt"]


# -------------------------------------------------------------------------------------------------- resume
DYNAMIC = [
    "--model.sft.steps=1", "--model.rl.steps=3", "--model.rl.lr=1e-3",
    "--model.rl.rewards=[shaped_rewards:length_on_odd_answers]", "--model.rl.reward_weights=[1.0]",
    "--model.rl.dynamic_sampling.enable=true",
]  # fmt: skip
STOP_AT = 2  # the SFT step and the first RL step


def test_dynamic_sampling_resumes_exactly(tmp_path_factory):
    whole = run_tiny(tmp_path_factory.mktemp("whole"), *DYNAMIC)
    root = tmp_path_factory.mktemp("split")
    first = run_tiny(root, *DYNAMIC, f"--trainer.max_steps={STOP_AT}")
    checkpoint = torch.load(
        Path(first.trainer.default_root_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    drawn = checkpoint["ReasoningDataModule"]["rl_rounds_drawn"]
    second = run_tiny(root, *DYNAMIC, "--ckpt_path=last")
    assert 0 < drawn < second.datamodule.rl_rounds_drawn == whole.datamodule.rl_rounds_drawn  # rounds on both sides
    a, b = whole.model.policy.state_dict(), second.model.policy.state_dict()
    moved = max((a[k] - first.model.policy.state_dict()[k]).abs().max().item() for k in a)
    assert moved > 1e-4, "the steps after the stop must change the weights, or equality proves nothing"
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
