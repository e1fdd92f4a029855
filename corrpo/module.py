"""CorrPOModule: one LightningModule that runs SFT, then GRPO-family RL, with manual optimisation.

Phases come from the data: batch ``i`` of the train loader is an SFT batch while ``i < sft.steps`` and a
batch of RL prompts after (see :class:`corrpo.data.datamodule.ReasoningDataModule`). So either phase may be
empty (SFT-only, RL-zero), a phase boundary is a batch index, and every step is reproducible from its index.

- SFT step: mean NLL over completion tokens (prompt tokens are context, not targets).
- RL step: rollout (G samples per prompt) -> rewards -> group advantages -> ``num_iterations`` updates of
  the clipped surrogate (+ optional k3 KL to a frozen reference). The math lives in
  :mod:`corrpo.objectives`; this file only wires it.

Manual optimisation because an RL step is not one forward/backward: it generates, scores and then may
update several times on the same rollouts. Two optimizers (SFT, RL) so RL starts with fresh moments.
A non-finite loss or gradient skips the update (counted in ``skipped_updates``, warned): weights never
become NaN.

Exact resume: the module counts finished train batches (``steps_done``) and saves it with the RNG states
in every checkpoint. On ``--ckpt_path`` the data module starts its stream at ``steps_done`` (see
:meth:`corrpo.data.datamodule.ReasoningDataModule.train_dataloader`) and the RNG states are put back just
before the first resumed batch, so N steps in one go and N/2 + resume + N/2 give the same weights.
"""

from __future__ import annotations

import json
import math
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from corrpo.batching import encode_prompts, encode_sft_batch, position_ids_from_mask
from corrpo.config import OptimConfig, RLConfig, SFTConfig
from corrpo.inversion.entropy import token_entropy_bits
from corrpo.inversion.rollout_bonus import inversion_bonus, rollout_correlations
from corrpo.lora import LoRAConfig, apply_lora
from corrpo.models import TinyArchitecture, export_policy, load_policy
from corrpo.objectives import (
    clipped_policy_loss,
    group_advantages,
    high_entropy_mask,
    masked_mean,
    token_log_probs,
    zero_std_fraction,
)
from corrpo.rewards import reward_functions
from corrpo.rewards.accuracy import accuracy_reward
from corrpo.rewards.combine import RewardFailureMonitor, completion_rows, score_completions
from corrpo.rng import restore_rng_states, rng_states
from corrpo.rollout import Generator, HFGenerator, Rollout
from corrpo.run_dir import run_dir
from corrpo.schedule import warmup_cosine_lr


class CorrPOModule(L.LightningModule):
    """SFT then GRPO-family RL on a Hugging Face causal LM.

    Args:
        policy: ``tiny-qwen2`` / ``tiny-llama`` (built offline), a local folder, or a Hugging Face name.
        tiny: size of the tiny model (ignored for real models).
        dtype: parameter dtype (``float32``, ``bfloat16``); use Trainer ``precision`` for mixed precision.
        attn_implementation: attention kernel for real models (``sdpa``, ``eager``, ``flash_attention_2``).
        sft: phase-1 arguments.
        rl: phase-2 arguments.
        use_chat_template: wrap prompts with the tokenizer's chat template.
        eval_batch_size: prompts per greedy generate call when measuring test accuracy.
        seed: seed of the tiny model's initial weights (and of the LoRA ``A`` init).
        lora: LoRA adapters through PEFT (``pip install "corrpo[lora]"``): only the adapters train, the
            inversion is measured on the effective weights ``W + (alpha / r) B A``; unset = full fine-tuning.
        generator: the rollout engine, a :class:`corrpo.rollout.Generator` (class path in a config); None =
            :class:`HFGenerator` (``model.generate``); :class:`corrpo.vllm_generator.VLLMGenerator` for vLLM.
    """

    def __init__(
        self,
        policy: str = "tiny-qwen2",
        tiny: TinyArchitecture = TinyArchitecture(),
        dtype: str = "float32",
        attn_implementation: str | None = None,
        sft: SFTConfig = SFTConfig(),
        rl: RLConfig = RLConfig(),
        use_chat_template: bool = False,
        eval_batch_size: int = 64,
        seed: int = 0,
        lora: LoRAConfig | None = None,
        generator: Generator | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator"])  # an engine (vLLM) is not a hyperparameter to pickle
        self.automatic_optimization = False
        self.sft = sft
        self.rl = rl
        self.use_chat_template = use_chat_template
        if eval_batch_size < 1:
            raise ValueError(f"model.eval_batch_size must be >= 1, got {eval_batch_size}")
        self.eval_batch_size = eval_batch_size
        self.policy, self.tokenizer = load_policy(policy, tiny, dtype, attn_implementation, seed)
        if lora is not None:
            self.policy = apply_lora(self.policy, lora, seed)
        self.reward_fns = reward_functions(self.rl.rewards)
        self.reward_weights = self.rl.reward_weights or [1.0] * len(self.reward_fns)
        self.reward_monitor = RewardFailureMonitor(self.rl.max_reward_failure_share, self.rl.reward_failure_patience)
        if len(self.reward_weights) != len(self.reward_fns):
            n_weights, n_rewards = len(self.reward_weights), len(self.reward_fns)
            raise ValueError(f"rl.reward_weights has {n_weights} entries for {n_rewards} rewards (rl.rewards)")
        self.generator: Generator = generator if generator is not None else HFGenerator()
        self._generator_stale = False  # the policy changed since the generator last synced its weights
        # The KL reference is the policy as RL starts (refreshed at the boundary); a submodule so that it
        # moves with the module and is saved in checkpoints.
        self.ref_policy = None
        if self.rl.beta > 0:
            self.ref_policy, _ = load_policy(policy, tiny, dtype, attn_implementation, seed)
            if lora is not None:  # wrapped like the policy, so the boundary refresh is a plain load_state_dict
                self.ref_policy = apply_lora(self.ref_policy, lora, seed)
            self.ref_policy.requires_grad_(False).eval()
        self.skipped_updates = 0
        self.eval_history: list[dict] = []
        self.last_completions: list[dict] = []  # this rank's last RL batch, one row per completion
        self.steps_done = 0  # train batches finished; where a resumed run starts
        self._rng_to_restore: dict | None = None

    # ----------------------------------------------------------------------------------------- phases
    def phase_at(self, batch_idx: int) -> str:
        """``sft`` for the first ``sft.steps`` batches, ``rl`` after."""
        return "sft" if batch_idx < self.sft.steps else "rl"

    @property
    def total_steps(self) -> int:
        return self.sft.steps + self.rl.steps

    def configure_optimizers(self):
        # with model.lora only the adapters require grad: the frozen base gets no AdamW state
        params = [p for p in self.policy.parameters() if p.requires_grad]
        sft_opt = torch.optim.AdamW(params, lr=self.sft.lr, weight_decay=self.sft.weight_decay)
        rl_opt = torch.optim.AdamW(params, lr=self.rl.lr, weight_decay=self.rl.weight_decay)
        return [sft_opt, rl_opt]

    def on_train_start(self) -> None:
        if self.steps_done == 0:  # a resumed run measured its start already
            self.evaluate_and_log("start")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if batch["step"] != self.steps_done:
            raise RuntimeError(
                f"batch of step {batch['step']} arrived after {self.steps_done} finished steps: the train loader "
                "must be the data module's step stream (it starts where a resumed run stopped)"
            )
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        if batch["phase"] == "rl" and batch["step"] == self.sft.steps:
            if self.sft.steps > 0:
                self.evaluate_and_log("sft_end")
            if self.ref_policy is not None:
                self.ref_policy.load_state_dict(self.policy.state_dict())

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._log_step("phase", float(batch["phase"] == "rl"), prog_bar=True)
        # train batches so far, emergence.csv's x-axis: differs from the global (optimizer) step when an RL
        # batch makes rl.num_iterations updates; pick it as the x-axis in wandb to line both up
        self._log_step("batches", float(batch["step"] + 1))
        if batch["phase"] == "sft":
            self._sft_step(batch)
        else:
            self._rl_step(batch)
        self.steps_done = batch["step"] + 1

    def on_train_end(self) -> None:
        self.evaluate_and_log("end")
        if self.trainer.is_global_zero:
            folder = export_policy(self.policy, self.tokenizer, run_dir(self.trainer) / "policy")
            results = {"test_accuracy": self.eval_history, "skipped_updates": self.skipped_updates}
            (run_dir(self.trainer) / "results.json").write_text(json.dumps(results, indent=2))
            rank_zero_info(f"[corrpo] policy exported to {folder}")

    # -------------------------------------------------------------------------------------- updates
    def _lr_at(self, config: OptimConfig, step: int) -> float:
        total = self.sft.steps if config is self.sft else self.rl.steps * self.rl.num_iterations
        return warmup_cosine_lr(config.lr, step, total, config.warmup_steps, config.min_lr_ratio)

    def _tokens_per_rank(self, mask: torch.Tensor) -> torch.Tensor:
        """Denominator of a token-mean loss: the token count, averaged over ranks under DDP.

        Each rank divides its token sum by ``global_count / world_size``; DDP averages the gradients over
        ranks, so the step equals a single process's token mean over the whole batch.
        """
        count = mask.sum().float()
        if self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="mean")
        return count.clamp(min=1.0)

    def _apply_update(self, loss: torch.Tensor, optimizer, config: OptimConfig, step: int) -> bool:
        """Backward, clip, step; skip (and count) when the loss or the gradient norm is not finite.

        Under DDP the ranks agree first: if any rank's loss is not finite every rank skips (a rank that skipped
        the backward alone would leave the others waiting in the gradient all-reduce).
        """
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            where = "" if self.trainer.world_size == 1 else f" on rank {self.global_rank} or another"
            self._skip(f"non-finite loss {loss.item()}{where}")
            return False
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self._skip(f"non-finite gradient norm {grad_norm.item()}")
            return False
        for group in optimizer.param_groups:
            group["lr"] = self._lr_at(config, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._generator_stale = True
        self._log_step("grad_norm", grad_norm)
        self._log_step("lr", optimizer.param_groups[0]["lr"])
        return True

    def _skip(self, why: str) -> None:
        self.skipped_updates += 1
        warnings.warn(f"update skipped at global step {self.global_step}: {why}", stacklevel=3)
        self._log_step("skipped_updates", float(self.skipped_updates))

    def _log_step(self, key: str, value, prog_bar: bool = False) -> None:
        """Log a per-step scalar; under DDP the mean over ranks (every rank logs the same keys in order)."""
        self.log(key, value, on_step=True, prog_bar=prog_bar, batch_size=1, sync_dist=self.trainer.world_size > 1)

    def _forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, model=None) -> torch.Tensor:
        model = model if model is not None else self.policy
        position_ids = position_ids_from_mask(attention_mask)
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits

    def _sft_step(self, batch: dict) -> None:
        enc = encode_sft_batch(
            self.tokenizer, batch["prompt"], batch["completion"], self.sft.max_length, self.use_chat_template
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        logits = self._forward_logits(enc["input_ids"], enc["attention_mask"])
        targets = enc["input_ids"][:, 1:]
        mask = enc["loss_mask"][:, 1:]
        nll = -token_log_probs(logits[:, :-1], targets)
        loss = (nll * mask).sum() / self._tokens_per_rank(mask)
        sft_opt, _ = self.optimizers()
        self._apply_update(loss, sft_opt, self.sft, batch["step"])
        self._log_step("loss", loss.detach(), prog_bar=True)

    # ----------------------------------------------------------------------------------------- RL
    def generate_rollout(self, prompts: list[str], num_generations: int, greedy: bool = False) -> Rollout:
        enc = encode_prompts(self.tokenizer, prompts, self.rl.max_prompt_length, self.use_chat_template)
        if self._generator_stale:  # e.g. vLLM holds its own copy of the weights: refresh it after updates
            self.generator.sync_weights(self.policy)
            self._generator_stale = False
        return self.generator.generate(
            self.policy,
            enc["input_ids"].to(self.device),
            enc["attention_mask"].to(self.device),
            num_generations,
            self.rl.sampling,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            greedy=greedy,
        )

    def decode_completions(self, rollout: Rollout) -> list[str]:
        ids = rollout.completion_ids.masked_fill(~rollout.completion_mask, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _completion_log_probs(self, rollout: Rollout, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs ``[N, L]`` of the completion tokens and the logits that produced them."""
        logits = self._forward_logits(rollout.sequences, rollout.attention_mask, model)
        logits = logits[:, rollout.prompt_length - 1 : -1]
        return token_log_probs(logits, rollout.completion_ids), logits

    def _rl_step(self, batch: dict) -> None:
        G = self.rl.num_generations
        timings = {}
        t0 = time.perf_counter()
        rollout = self.generate_rollout(batch["prompt"], G)
        timings["generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        completions = self.decode_completions(rollout)
        prompts = [p for p in batch["prompt"] for _ in range(G)]
        answers = [a for a in batch["answer"] for _ in range(G)]
        scores = score_completions(
            self.reward_fns, self.reward_weights, prompts, completions, answers, monitor=self.reward_monitor
        )
        rewards = scores.total.to(self.device)
        timings["score"] = time.perf_counter() - t0

        rho = None
        if self.rl.inversion.coef > 0:
            t0 = time.perf_counter()
            bonus, rho = self._inversion_reward(rollout, batch["step"] - self.sft.steps, scores)
            rewards = rewards + bonus
            timings["inversion"] = time.perf_counter() - t0
        advantages = group_advantages(rewards, G, self.rl.scale_rewards)
        self.last_completions = completion_rows(batch["step"], prompts, completions, scores, rewards, advantages, rho)

        loss_mask = rollout.completion_mask
        if self.rl.mask_truncated_completions:
            loss_mask = loss_mask & ~rollout.truncated.unsqueeze(1)
        old_log_probs = ref_log_probs = None
        with torch.no_grad():
            if self.rl.num_iterations > 1:
                old_log_probs, _ = self._completion_log_probs(rollout)
            if self.ref_policy is not None:
                ref_log_probs, _ = self._completion_log_probs(rollout, self.ref_policy)

        t0 = time.perf_counter()
        _, rl_opt = self.optimizers()
        for iteration in range(self.rl.num_iterations):
            log_probs, logits = self._completion_log_probs(rollout)
            token_entropy = None
            if iteration == 0 or self.rl.top_entropy_quantile < 1.0:
                with torch.no_grad():
                    token_entropy = token_entropy_bits(logits, rollout.completion_mask)
            if iteration == 0:
                entropy = masked_mean(token_entropy, rollout.completion_mask)
            out = clipped_policy_loss(
                log_probs,
                old_log_probs if old_log_probs is not None else log_probs.detach(),
                advantages,
                loss_mask,
                self.rl.epsilon_low,
                self.rl.epsilon_high,
                self.rl.loss_type,
                self.rl.sampling.max_new_tokens,
                ref_log_probs,
                self.rl.beta,
                num_tokens=self._tokens_per_rank(loss_mask) if self.rl.loss_type == "dapo" else None,
                train_mask=self._high_entropy_tokens(token_entropy, loss_mask),
                policy_loss=self.rl.policy_loss,
                cov_ratio=self.rl.cov_ratio,
                clip_cov_bounds=(self.rl.clip_cov_lb, self.rl.clip_cov_ub),
                kl_cov_coef=self.rl.kl_cov_coef,
            )
            rl_step = (batch["step"] - self.sft.steps) * self.rl.num_iterations + iteration
            self._apply_update(out.loss, rl_opt, self.rl, rl_step)
        timings["update"] = time.perf_counter() - t0

        self._log_rl(batch, rewards, scores, rollout, out, entropy, timings)

    def _high_entropy_tokens(self, token_entropy: torch.Tensor | None, loss_mask: torch.Tensor) -> torch.Tensor | None:
        """``rl.top_entropy_quantile < 1``: the loss tokens in the top fraction by entropy, the threshold taken
        over every rank's tokens (:func:`corrpo.objectives.high_entropy_mask`); else None (train on all)."""
        quantile = self.rl.top_entropy_quantile
        if quantile >= 1.0:
            return None
        if self.trainer.world_size == 1:
            return high_entropy_mask(token_entropy, loss_mask, quantile)
        # ranks' completions differ in width: pad to max_new_tokens so all_gather sees one shape
        pad = (0, self.rl.sampling.max_new_tokens - token_entropy.shape[1])
        every_entropy = self.all_gather(F.pad(token_entropy, pad))
        every_mask = self.all_gather(F.pad(loss_mask.float(), pad))
        keep = high_entropy_mask(every_entropy, every_mask, quantile)[self.global_rank]
        return keep[:, : token_entropy.shape[1]]

    def _inversion_reward(self, rollout: Rollout, rl_step: int, scores) -> tuple[torch.Tensor, torch.Tensor]:
        """CorR-PO: ``coef * clip(-rho_i, -1, 1)`` per response, on the policy that sampled it; returns (bonus, rho).

        ``rho_i`` correlates entropy and logit-gradient strength over response ``i``'s own completion tokens
        (:mod:`corrpo.inversion.rollout_bonus`). Responses shorter than ``min_tokens`` or with a constant side
        get 0 and are counted in ``inversion/rollout_nan_frac``.
        """
        config = self.rl.inversion
        rho, n_tokens = rollout_correlations(
            self.policy, rollout.sequences, rollout.attention_mask, rollout.token_mask, config
        )
        bonus, valid = inversion_bonus(
            rho, n_tokens, config.coef_at(rl_step), config.min_tokens, self.rl.num_generations, config.center
        )
        scores.per_function["inversion"] = bonus.detach().float().cpu()
        self._log_step(
            "inversion/rollout_spearman" if config.correlation == "spearman" else "inversion/rollout_pearson",
            self._pooled_mean(rho[valid]),
        )
        self._log_step("inversion/rollout_nan_frac", 1.0 - valid.float().mean())
        self._log_step("rewards/inversion/std", bonus.float().std() if bonus.numel() > 1 else 0.0)
        return bonus.to(self.device, torch.float32), rho

    def _summed_over_ranks(self, *values: float) -> list[float]:
        """Each of ``values`` summed over the DDP ranks (itself on one process), in float64."""
        stats = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        return stats.tolist()

    def _pooled_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over every rank's ``values`` (under DDP: not the mean of the ranks' means, which would weigh
        a rank with few values like one with many, and be NaN if any rank had none); NaN when there are none."""
        total, count = self._summed_over_ranks(values.double().sum().item(), values.numel())
        return torch.tensor(total / count if count else float("nan"), dtype=torch.float32)

    def _log_rl(self, batch, rewards, scores, rollout, out, entropy, timings) -> None:
        lengths = rollout.completion_mask.sum(dim=1).float()
        metrics = {
            "loss": out.loss.detach(),
            "reward": rewards.mean(),
            "reward_std": rewards.view(-1, self.rl.num_generations).std(dim=1).mean()
            if self.rl.num_generations > 1
            else torch.zeros(()),
            "frac_reward_zero_std": zero_std_fraction(rewards, self.rl.num_generations),
            "entropy": entropy,
            "kl": out.kl,
            "clip_ratio/low_mean": out.clip_low,
            "clip_ratio/high_mean": out.clip_high,
            **({"clip_ratio/cov_selected": out.cov_selected} if out.cov_selected is not None else {}),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": rollout.truncated.float().mean(),
        }
        for name, values in scores.per_function.items():
            metrics[f"rewards/{name}/mean"] = torch.nanmean(values)  # NaN, not a fake 0, when nothing was scored
            if name in self.reward_fns:  # logged even when 0: under DDP every rank logs the same keys
                metrics[f"rewards/{name}/failed"] = float(scores.n_failed.get(name, 0))
                metrics[f"rewards/{name}/unscored"] = float(scores.n_unscored.get(name, 0))
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        for key, value in metrics.items():
            self._log_step(key, value, prog_bar=key in ("reward", "loss"))

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def accuracy_counts(self, records: list[dict]) -> tuple[float, int]:
        """Greedy decoding, math-verify: ``(correct, scored)`` over held-out prompts; unscorable golds are
        left out of both."""
        scores = []
        for i in range(0, len(records), self.eval_batch_size):
            chunk = records[i : i + self.eval_batch_size]
            rollout = self.generate_rollout([r["prompt"] for r in chunk], 1, greedy=True)
            completions = self.decode_completions(rollout)
            values = accuracy_reward([r["prompt"] for r in chunk], completions, answer=[r["answer"] for r in chunk])
            scores.extend(v for v in values if v is not None)
        return float(sum(scores)), len(scores)

    def test_accuracy(self, records: list[dict]) -> float:
        """Greedy-decoding accuracy (math-verify) on held-out prompts; unscorable golds are excluded."""
        correct, scored = self.accuracy_counts(records)
        return correct / max(scored, 1)

    def evaluate_and_log(self, when: str) -> float | None:
        """Measure test accuracy now, log it as ``eval/test_accuracy`` and keep it for ``results.json``.

        Under DDP each rank decodes every ``world_size``-th test prompt and the counts are summed across
        ranks, so the test set is decoded once in all, not once per rank.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "test_records"):
            return None
        shard = datamodule.test_records()[self.global_rank :: self.trainer.world_size]
        correct, scored = self._summed_over_ranks(*self.accuracy_counts(shard))
        accuracy = correct / max(scored, 1)
        self.eval_history.append({"when": when, "step": self.global_step, "accuracy": accuracy, "scored": int(scored)})
        for logger in self.trainer.loggers:
            logger.log_metrics({"eval/test_accuracy": accuracy}, step=self.global_step)
        rank_zero_info(f"[corrpo] test accuracy at {when} (step {self.global_step}): {accuracy:.3f}")
        return accuracy

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        records = [{"prompt": p, "answer": a} for p, a in zip(batch["prompt"], batch["answer"], strict=True)]
        self.log("val/accuracy", self.test_accuracy(records), batch_size=len(records))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        records = [{"prompt": p, "answer": a} for p, a in zip(batch["prompt"], batch["answer"], strict=True)]
        self.log("test/accuracy", self.test_accuracy(records), batch_size=len(records))

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["corrpo"] = {
            "skipped_updates": self.skipped_updates,
            "eval_history": self.eval_history,
            "steps_done": self.steps_done,
            "rng": rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("corrpo", {})
        self.skipped_updates = state.get("skipped_updates", 0)
        self.eval_history = state.get("eval_history", [])
        self.steps_done = state.get("steps_done", 0)
        self._generator_stale = True  # the restored weights are not what a generator may have synced
        self._rng_to_restore = state.get("rng")
