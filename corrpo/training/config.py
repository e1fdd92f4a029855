"""Typed, defaulted, validated arguments of the two training phases.

These dataclasses *are* the config: LightningCLI reads their fields (and the attribute docstrings as
help), YAML recipes set them under ``model.init_args.sft`` / ``model.init_args.rl``, and ``__post_init__``
rejects bad values before any training starts, naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from corrpo.generation.rollout import SamplingConfig
from corrpo.models.finite import require_finite_fields
from corrpo.rewards.combine import checked_reward_weights
from corrpo.rewards.spec import parse_reward_spec
from corrpo.training.corrpo_term import CorrPOTermConfig
from corrpo.training.covariance_tokens import POLICY_LOSSES
from corrpo.training.dynamic_sampling import DynamicSamplingConfig
from corrpo.training.objectives import LOSS_TYPES, REWARD_SCALES, LossOptions


@dataclass
class OptimConfig:
    """What both phases share: their length and their AdamW + warm-up/cosine schedule + clip."""

    steps: int = 0
    """Batches of this phase; 0 skips it (SFT-only or RL-zero)."""
    lr: float = 1e-5
    """AdamW learning rate (each phase has its own optimizer: SFT moments do not carry over to RL)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps of this phase."""
    min_lr_ratio: float = 1.0
    """Cosine decay after warm-up to ``min_lr_ratio * lr`` at the last step; 1 keeps the lr constant."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; 0 disables it."""
    micro_batch_size: int | None = None
    """Rows per forward/backward; their gradients accumulate into the one update of the batch, normalised exactly
    as the whole batch (the same update, less activation memory). None = the whole batch at once. This, not
    ``trainer.accumulate_grad_batches``, is gradient accumulation under corrpo's manual optimisation."""
    packing: bool = True
    """Padding-free forwards: each (micro-)batch's sequences packed into fewer rows, with per-sequence positions
    and a block-diagonal causal mask (:mod:`corrpo.models.packing`): the same loss and gradients, fewer pad slots. A
    model whose packed logits differ from its padded ones (checked once) keeps the padded forward."""
    max_consecutive_skipped_updates: int = 3
    """Stop the run with an error after this many updates in a row were skipped (a non-finite loss or gradient
    norm: :func:`corrpo.training.update.apply_update`), naming the likely cause; one skip alone is a warning. 0
    never stops (every skip still counts as a step: ``global_step`` and ``skipped_updates``)."""

    def _check(self, section: str) -> None:
        require_finite_fields(self, section)  # YAML's .inf / .nan: no float key of either phase may be non-finite
        _check_non_negative(section, steps=self.steps, warmup_steps=self.warmup_steps, max_grad_norm=self.max_grad_norm)
        _check_non_negative(section, weight_decay=self.weight_decay)
        _check_non_negative(section, max_consecutive_skipped_updates=self.max_consecutive_skipped_updates)
        _check_positive(section, lr=self.lr, min_lr_ratio=self.min_lr_ratio)
        _check_optional_positive_int(section, micro_batch_size=self.micro_batch_size)


@dataclass
class SFTConfig(OptimConfig):
    """Phase 1: supervised fine-tuning on reasoning traces (NLL on completion tokens only)."""

    max_length: int = 1024
    """Prompt + completion tokens kept per example (cut from the right)."""

    def __post_init__(self) -> None:
        self._check("sft")
        _check_positive("sft", max_length=self.max_length)


@dataclass
class RLConfig(OptimConfig):
    """Phase 2: GRPO-family RL (CorR-PO when the inversion reward is on). ``steps`` counts rollout batches;
    each does ``num_iterations`` optimizer steps."""

    lr: float = 1e-6
    """AdamW learning rate of the RL optimizer."""
    num_generations: int = 8
    """G: completions sampled per prompt (the group)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Temperature, top_p, max_new_tokens."""
    max_prompt_length: int | None = None
    """Prompt tokens kept (from the left); None keeps all."""
    rewards: list[str | dict[str, Any]] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions: registry names or import paths ``pkg.module:function``, or mappings
    (:mod:`corrpo.rewards.spec`): ``{function, kwargs, name}`` (a factory called with ``kwargs``), ``{function,
    style: verl}`` (verl's ``compute_score``), ``{model: <folder>, name, batch_size}`` (a reward model)."""
    reward_weights: list[float] | None = None
    """One weight per reward; None = all 1."""
    inversion: CorrPOTermConfig = field(default_factory=CorrPOTermConfig)
    """CorR-PO's reward term ``coef * clip(-rho_i, -1, 1)``; ``coef = 0`` (default) is plain GRPO."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage normalisation: ``group`` (GRPO), ``batch``, or ``none`` (Dr. GRPO)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """Loss aggregation: ``grpo`` (per-sequence mean), ``dr_grpo`` (constant normaliser), ``dapo`` (token mean
    over the whole batch, all ranks), ``bnpo`` (token mean of each rank's own batch)."""
    epsilon_low: float = 0.2
    """Lower clip: the ratio is clipped at ``1 - epsilon_low``."""
    epsilon_high: float = 0.2
    """Upper clip: ``1 + epsilon_high`` (DAPO's clip-higher uses 0.28)."""
    beta: float = 0.0
    """KL coefficient to the frozen reference (the policy at the start of RL); 0 loads no reference."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """``token``: a ratio per token (GRPO). ``sequence``: GSPO, one ratio per response, the geometric mean of its
    tokens' ratios (TRL's ``importance_sampling_level``, verl's ``loss_mode: gspo``; arXiv 2507.18071)."""
    delta: float | None = None
    """TRL's two-sided clip: the unclipped ratio is capped at ``delta`` too (> 1; TRL recommends > ``1 +
    epsilon_high``); None = off."""
    entropy_coef: float = 0.0
    """TRL's entropy bonus: the loss is ``L - entropy_coef * H`` with ``H`` the mean entropy (nats, of
    ``softmax(logits / T)``) over the loss tokens (the top-entropy ones when selected); 0 = off."""
    sync_ref_model: bool = False
    """Move the KL reference toward the policy every ``ref_model_sync_steps`` RL updates (TR-DPO; TRL's
    ``sync_ref_model``): ``pi_ref <- alpha * pi + (1 - alpha) * pi_ref``. Needs ``beta > 0``."""
    ref_model_mixup_alpha: float = 0.6
    """``alpha`` of the sync, in (0, 1] (TRL's default 0.6; 1 copies the policy)."""
    ref_model_sync_steps: int = 512
    """``tau``: RL optimizer updates between two syncs (TRL's default 512)."""
    use_bias_correction_kl: bool = False
    """Multiply the k3 KL by the importance ratio (TRL's ``use_bias_correction_kl``, True by default there): the
    unbiased reverse-KL gradient of DeepSeek-V3.2. False (corrpo's default) keeps the plain k3 penalty of
    DeepSeekMath's GRPO; set it true to match a TRL run with ``beta > 0``."""
    unscorable_rewards: Literal["skip", "zero"] = "skip"
    """A completion no reward function could score (every one returned None/NaN): ``skip`` (TRL's handling) leaves it
    out of its group's mean and std and gives it advantage 0; ``zero`` scores it 0 like any other sample (corrpo
    before this key existed)."""
    mask_truncated_completions: bool = False
    """Exclude completions that hit ``max_new_tokens`` from the loss (DAPO)."""
    policy_loss: Literal["clip", "clip_cov", "kl_cov"] = "clip"
    """The surrogate: ``clip`` (PPO/GRPO), ``clip_cov`` or ``kl_cov`` (Cui et al. 2025, verl's loss modes:
    restrain the few tokens whose log-prob/advantage covariance is largest;
    :mod:`corrpo.training.covariance_tokens`)."""
    cov_ratio: float = 2e-4
    """Clip-Cov / KL-Cov: the fraction of loss tokens selected (at least one)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov: only tokens with covariance above this ..."""
    clip_cov_ub: float = 5.0
    """... and below this are candidates."""
    kl_cov_coef: float = 1.0
    """KL-Cov: weight of ``|logp - logp_old|`` on the selected tokens (0 unless ``num_iterations > 1``)."""
    top_entropy_quantile: float = 1.0
    """Train only on the completion tokens in this top fraction by entropy, threshold over the whole batch (all
    ranks); 1.0 trains on every token (TRL's ``top_entropy_quantile``; 0.2 in "Beyond the 80/20 rule")."""
    num_iterations: int = 1
    """Optimizer updates per rollout batch (mu); old log-probs are stored for the ratio when > 1."""
    max_reward_failure_share: float = 0.5
    """Abort the run when a reward function fails (raises, or returns +-inf) on more than this share of a
    step's samples for ``reward_failure_patience`` consecutive RL steps; 1.0 never aborts."""
    reward_failure_patience: int = 3
    """Consecutive RL steps over ``max_reward_failure_share`` before the abort (a broken verifier, not one bad
    completion)."""
    reward_timeout_s: float | None = 600.0
    """Seconds one reward function may take on one RL step's completions (its retries included); over it, every
    sample of the call counts failed and scores 0, with a warning naming it, so a hung reward cannot hang the run
    (enforced with SIGALRM on the main thread, where Lightning trains). null: no limit."""
    reward_dry_run: bool = True
    """Call every reward once at fit start, on a few RL records with placeholder completions
    (:mod:`corrpo.rewards.dry_run`): a reward that raises on all of them or returns a wrong shape stops the run
    before SFT. false skips it (a reward that cannot score placeholders)."""
    generation_batch_size: int | None = None
    """Completions per generate call (whole groups: ``max(1, generation_batch_size // num_generations)`` prompts a
    call); None = the whole batch in one call. Bounds the rollout's KV cache and logits."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """DAPO's dynamic sampling (verl's ``algorithm.filter_groups``): ``{enable, metric, max_num_gen_batches}``, drop
    the groups whose rewards are all equal and sample more prompts until the batch is full
    (:mod:`corrpo.training.dynamic_sampling`)."""

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if isinstance(self.inversion, dict):
            self.inversion = CorrPOTermConfig(**self.inversion)
        if isinstance(self.dynamic_sampling, dict):
            self.dynamic_sampling = DynamicSamplingConfig(**self.dynamic_sampling)
        self._check("rl")
        _check_optional_positive_int("rl", generation_batch_size=self.generation_batch_size)
        _check_non_negative("rl", beta=self.beta)
        _check_positive("rl", num_generations=self.num_generations, num_iterations=self.num_iterations)
        if self.num_generations == 1 and self.steps > 0:
            # a group of one is its own mean: every advantage is 0, so RL would leave the weights untouched
            raise ValueError(
                f"rl.num_generations=1 with rl.steps={self.steps}: GRPO advantages are reward minus the group "
                "mean, all 0 for a group of one, so the RL phase would train nothing; use rl.num_generations >= 2"
            )
        if self.max_prompt_length is not None and not self.max_prompt_length > 0:
            raise ValueError(f"rl.max_prompt_length must be None (keep all) or > 0, got {self.max_prompt_length!r}")
        if not 0.0 < self.max_reward_failure_share <= 1.0:
            raise ValueError(f"rl.max_reward_failure_share must be in (0, 1], got {self.max_reward_failure_share!r}")
        _check_positive("rl", reward_failure_patience=self.reward_failure_patience)
        if self.reward_timeout_s is not None and not 0 < self.reward_timeout_s < math.inf:
            raise ValueError(
                f"rl.reward_timeout_s must be a positive number of seconds or null, got {self.reward_timeout_s!r}"
            )
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "rl.importance_sampling_level must be 'token' or 'sequence' (GSPO), got "
                f"{self.importance_sampling_level!r}"
            )
        if self.importance_sampling_level == "sequence" and self.policy_loss != "clip":
            raise ValueError(
                f"rl.importance_sampling_level=sequence (GSPO) is a clip loss; rl.policy_loss={self.policy_loss!r} "
                "selects tokens by their own ratios: use rl.policy_loss=clip with it"
            )
        if self.delta is not None and not self.delta > 1.0:
            raise ValueError(
                f"rl.delta={self.delta} must be > 1 (TRL recommends > 1 + rl.epsilon_high) or null (off): a cap at or "
                "below ratio 1 stops the gradient of every token at the first update, so RL would train nothing"
            )
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"rl.entropy_coef must be a finite number, got {self.entropy_coef!r}")
        if self.sync_ref_model and self.beta == 0:
            raise ValueError(
                "rl.sync_ref_model is true but rl.beta is 0: no KL reference is loaded, so there is nothing to sync; "
                "set rl.beta > 0 or rl.sync_ref_model false"
            )
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"rl.ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha!r}")
        _check_positive("rl", ref_model_sync_steps=self.ref_model_sync_steps)
        if self.unscorable_rewards not in ("skip", "zero"):
            raise ValueError(f"rl.unscorable_rewards must be 'skip' or 'zero', got {self.unscorable_rewards!r}")
        if self.scale_rewards not in REWARD_SCALES:
            raise ValueError(f"rl.scale_rewards must be one of {REWARD_SCALES}, got {self.scale_rewards!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"rl.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"rl.policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}")
        if not 0.0 < self.cov_ratio <= 1.0:
            raise ValueError(f"rl.cov_ratio must be in (0, 1], got {self.cov_ratio!r}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"rl.clip_cov_lb ({self.clip_cov_lb}) must be below rl.clip_cov_ub ({self.clip_cov_ub})")
        _check_non_negative("rl", kl_cov_coef=self.kl_cov_coef)
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"rl.top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile!r}")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError("rl.epsilon_low must be in [0, 1) and rl.epsilon_high >= 0")
        if not self.rewards:
            raise ValueError("rl.rewards must name at least one reward function")
        for i, entry in enumerate(self.rewards):  # the form of each entry; importing waits for the module
            parse_reward_spec(entry, f"rl.rewards[{i}]")
        checked_reward_weights(self.reward_weights, len(self.rewards))  # one per reward, or a ValueError naming the key

    def loss_options(self) -> LossOptions:
        """The surrogate's settings these keys give (:func:`corrpo.training.objectives.clipped_policy_loss`)."""
        return LossOptions(
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            loss_type=self.loss_type,
            max_completion_length=self.sampling.max_new_tokens,
            beta=self.beta,
            policy_loss=self.policy_loss,
            cov_ratio=self.cov_ratio,
            clip_cov_bounds=(self.clip_cov_lb, self.clip_cov_ub),
            kl_cov_coef=self.kl_cov_coef,
            use_bias_correction_kl=self.use_bias_correction_kl,
            importance_sampling_level=self.importance_sampling_level,
            delta=self.delta,
        )


def _check_positive(section: str, **values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{section}.{key} must be > 0, got {value!r}")


def _check_non_negative(section: str, **values: float) -> None:
    for key, value in values.items():
        if not value >= 0:
            raise ValueError(f"{section}.{key} must be >= 0, got {value!r}")


def _check_optional_positive_int(section: str, **values: int | None) -> None:
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{section}.{key} must be a positive int or null (the whole batch), got {value!r}")
