"""DAPO's dynamic sampling: drop the groups whose rewards are all equal and sample more prompts in their place.

A group whose ``G`` rewards are all equal (all solved, all failed) has advantage 0 on every member: it costs a
rollout and a forward/backward and moves nothing (with the CorR-PO term in reward mode it hands the whole
advantage to the bonus). DAPO (Yu et al. 2025, arXiv 2503.14476, "dynamic sampling") over-samples instead: after
scoring, keep the groups whose rewards differ (:func:`corrpo.training.group_filter.varied_groups`); while fewer
than the batch's ``B`` groups are kept, sample and score another round of prompts; then train on the first ``B``
kept groups (the rest are dropped). So the update's batch size is exact.

This is verl's ``algorithm.filter_groups`` (``enable``, ``metric``, ``max_num_gen_batches``; the loop of
``recipe/dapo/dapo_ray_trainer.py`` ``fit()``) with its semantics:

- a round is one more batch of ``B`` prompts (verl's ``gen_batch_size``, here the step's own size), drawn by the
  data module (:meth:`corrpo.data.datamodule.ReasoningDataModule.next_rl_round`, a stream of its own whose position
  is in the checkpoint, so a resumed run draws what the uninterrupted one would);
- kept groups keep their round order and the batch is the first ``B`` of them (verl's ``batch[:traj_bsz]``);
- ``max_num_gen_batches`` bounds the rounds, the step's own batch included; when they are spent and the batch is
  still short, :class:`DynamicSamplingExhausted` stops the run, as verl raises (``<= 0``: no bound, verl's
  "endless trials", which loops for ever on prompts the policy always solves or always fails).

Under DDP every rank fills its own share of ``B`` (groups never span ranks) and the ranks sample in lockstep, a
round while any rank is short (FSDP2's generation is a collective), so every rank draws the same rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corrpo.training.collectives import SINGLE_PROCESS, Collectives
from corrpo.training.group_filter import TOTAL_REWARD, filter_values, varied_groups
from corrpo.training.sampled_groups import SampledGroups, join_groups


@dataclass
class DynamicSamplingConfig:
    """``rl.dynamic_sampling``: verl's ``algorithm.filter_groups`` keys, with its meanings."""

    enable: bool = False
    """Drop the groups whose ``metric`` is the same for all ``G`` samples and sample more prompts until the batch
    holds ``data.rl_batch_size`` groups whose values differ (DAPO). Off: every sampled group is trained on."""
    metric: str = TOTAL_REWARD
    """What must differ within a group: ``reward`` (the weighted total of ``rl.rewards``, before the CorR-PO term;
    verl's ``seq_reward`` and ``score`` name it too) or the name of one of ``rl.rewards`` (verl's ``acc`` is
    ``accuracy``)."""
    max_num_gen_batches: int = 10
    """Generation rounds per step at most, the step's own batch included (DAPO's recipe uses 10); a step still short
    after them stops the run with an error, as in verl. ``0`` (verl's default): no bound."""

    def __post_init__(self) -> None:
        if not isinstance(self.enable, bool):
            raise ValueError(f"rl.dynamic_sampling.enable must be true or false, got {self.enable!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"rl.dynamic_sampling.metric must be a non-empty name, got {self.metric!r}")
        if isinstance(self.max_num_gen_batches, bool) or not isinstance(self.max_num_gen_batches, int):
            raise ValueError(
                f"rl.dynamic_sampling.max_num_gen_batches must be an integer (<= 0: no bound), got "
                f"{self.max_num_gen_batches!r}"
            )


class DynamicSamplingExhausted(RuntimeError):
    """``rl.dynamic_sampling.max_num_gen_batches`` rounds were sampled and the batch is still short of varied
    groups (verl raises a ValueError here)."""


@dataclass
class FilledBatch:
    """A batch of ``B`` varied groups and how it was collected (this rank's batch, every rank's counts)."""

    batch: SampledGroups
    rounds: int
    """Generation rounds sampled, the step's own batch included (verl's ``num_gen_batches``)."""
    kept: int
    """Groups whose values differ, over every round and rank (verl's ``num_prompt_in_batch``; those past ``B`` are
    not trained on)."""
    dropped: int
    """Groups whose values are all equal, over every round and rank."""
    scored_samples: int
    """Completions this rank scored, every round's (the reward-failure monitor's denominator)."""

    def metrics(self) -> dict[str, float]:
        """Logged as ``rl/dynamic_sampling/<name>``."""
        return {
            "dynamic_sampling/generation_rounds": float(self.rounds),
            "dynamic_sampling/kept_groups": float(self.kept),
            "dynamic_sampling/dropped_groups": float(self.dropped),
        }


def fill_with_varied_groups(
    first: SampledGroups,
    sample_more: Callable[[], SampledGroups] | None,
    config: DynamicSamplingConfig,
    metric: str,
    skip_unscorable: bool = True,
    collectives: Collectives = SINGLE_PROCESS,
    pad_token_id: int = 0,
) -> FilledBatch:
    """``first``'s number of groups, all varied in ``metric`` (a
    :func:`corrpo.training.group_filter.resolve_metric` result), taken from ``first`` then from rounds of
    ``sample_more()`` (each samples and scores a new batch of prompts), as the module docstring describes.
    ``first`` itself is returned when all its groups vary (the step is then the one without dynamic sampling).
    ``sample_more`` None (no prompts to draw): a ValueError, before anything is filtered."""
    if sample_more is None:
        raise ValueError(
            "rl.dynamic_sampling.enable needs more prompts than the step's batch: the data module must offer "
            "next_rl_round() (corrpo.data.datamodule.ReasoningDataModule does), or RLContext.more_prompts be set"
        )
    target, group_size = first.n_groups, first.group_size
    parts: list[SampledGroups] = []
    found = dropped = rounds = scored = 0
    batch = first
    while True:
        rounds += 1
        scored += len(batch.inputs)
        keep = varied_groups(filter_values(batch.scores, metric, skip_unscorable), group_size)
        groups = keep.nonzero().flatten().tolist()
        found, dropped = found + len(groups), dropped + batch.n_groups - len(groups)
        parts.append(batch if len(groups) == batch.n_groups else batch.take(groups))
        if collectives.all_true(found >= target):
            break
        if 0 < config.max_num_gen_batches <= rounds:
            device = batch.rollout.sequences.device
            have, need = collectives.sum_floats(min(found, target), target, device=device)
            raise DynamicSamplingExhausted(
                f"rl.dynamic_sampling: after {rounds} generation rounds (rl.dynamic_sampling.max_num_gen_batches="
                f"{config.max_num_gen_batches}) the batch holds {int(have)} of its {int(need)} groups whose "
                f"{metric!r} differs; the other groups' samples all scored the same: the prompts are too easy or too "
                "hard for the policy. Raise max_num_gen_batches (0: no bound), choose another metric, or set "
                "rl.dynamic_sampling.enable false"
            )
        batch = sample_more()
    joined = join_groups(parts, pad_token_id)
    filled = joined if joined.n_groups == target else joined.take(list(range(target)))
    device = filled.rollout.sequences.device
    kept, dropped = collectives.sum_floats(found, dropped, device=device)
    return FilledBatch(filled, rounds, int(kept), int(dropped), scored)
