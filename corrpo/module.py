"""CorrPOModule: one LightningModule that runs SFT, then GRPO-family RL, with manual optimisation.

Phases come from the data: batch ``i`` of the train loader is an SFT batch while ``i < sft.steps`` and a
batch of RL prompts after (see :class:`corrpo.data.datamodule.ReasoningDataModule`). So either phase may be
empty (SFT-only, RL-zero), a phase boundary is a batch index, and every step is reproducible from its index.

- SFT step: mean NLL over completion tokens (prompt tokens are context, not targets).
- RL step: rollout (G samples per prompt) -> rewards -> group advantages -> ``num_iterations`` updates of
  the clipped surrogate (+ optional k3 KL to a frozen reference).

Both steps are plain code in :mod:`corrpo.training` (the benchmarks and tests call the same functions); this
file keeps Lightning's concerns only: optimizers, logging, phases, evaluation points, checkpoint state.

Manual optimisation because an RL step is not one forward/backward: it generates, scores and then may
update several times on the same rollouts. Two optimizers (SFT, RL) so RL starts with fresh moments; the SFT
moments are released at the boundary, so one optimizer state is alive (and checkpointed) at a time. Gradient
accumulation is ``sft.micro_batch_size`` / ``rl.micro_batch_size`` inside the one update of a batch.
A non-finite loss or gradient skips the update (warned, counted in ``skipped_updates`` and in ``global_step``); weights
made non-finite, or a streak of skips, stop the run (:mod:`corrpo.training.update`): nothing NaN is saved.

Exact resume: the module counts finished train batches (``steps_done``) and saves it with the RNG states
in every checkpoint. On ``--ckpt_path`` the data module starts its stream at ``steps_done`` (see
:meth:`corrpo.data.datamodule.ReasoningDataModule.train_dataloader`) and the RNG states are put back just
before the first resumed batch, so N steps in one go and N/2 + resume + N/2 give the same weights.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from corrpo import trainer_state
from corrpo.data.arithmetic import ArithmeticTask
from corrpo.data.records import load_records
from corrpo.generation.decode_loop import DecodeLoopGenerator
from corrpo.generation.rollout import Generator, Rollout, SamplingConfig, concat_rollouts
from corrpo.models.batching import PromptFormat, encode_prompts, prompt_position_budget
from corrpo.models.loading import TinyArchitecture, enable_gradient_checkpointing, export_policy, load_policy
from corrpo.models.lora import LoRAConfig, apply_lora
from corrpo.models.sharding import ShardingConfig, full_state_dict, is_sharded, shard_policies
from corrpo.rewards import reward_functions
from corrpo.rewards.call import StepInfo
from corrpo.rewards.dry_run import dry_run_rewards
from corrpo.rewards.reward_model import place_rewards
from corrpo.runs.progress import eval_progress
from corrpo.runs.run_folder import run_folder
from corrpo.training.collectives import SINGLE_PROCESS, Collectives, LightningCollectives
from corrpo.training.config import RLConfig, SFTConfig
from corrpo.training.evaluation import EvalConfig, EvalContext, Evaluator
from corrpo.training.forward import row_chunks
from corrpo.training.grpo import GRPOStep, RLContext
from corrpo.training.host import HeldOutData, require_held_out_data, seed_or_global
from corrpo.training.phases import PhaseSchedule
from corrpo.training.rng import restore_rng_states, rng_states
from corrpo.training.sft import SFTContext, sft_step
from corrpo.training.update import SkipStreak, UpdateOutcome, adamw


class CorrPOModule(L.LightningModule):
    """SFT then GRPO-family RL on a Hugging Face causal LM.

    Args:
        policy: ``tiny-<family>`` (``tiny-qwen2``, ``tiny-llama``, ``tiny-qwen3``, ... built offline, see
            :mod:`corrpo.models.tiny_families`), a local folder (with its tokenizer files), or a Hugging Face name.
        tiny: size of the tiny model (ignored for real models).
        dtype: parameter dtype (``float32``, ``bfloat16``); use Trainer ``precision`` for mixed precision.
        attn_implementation: attention kernel for real models (``sdpa``, ``eager``, ``flash_attention_2``).
        sft: phase-1 arguments.
        rl: phase-2 arguments.
        use_chat_template: wrap text prompts with the tokenizer's chat template (message-list prompts, TRL's
            conversational format, always are).
        system_prompt: a system message put first in every chat-rendered prompt that has none of its own
            (message-list prompts, and text prompts with ``use_chat_template``).
        chat_template_kwargs: extra keyword arguments of ``apply_chat_template``, e.g. ``{enable_thinking: false}``
            for Qwen3.
        eval_batch_size: prompts per greedy generate call when measuring test accuracy.
        seed: seed of the tiny model's initial weights and the LoRA ``A`` init; None: ``seed_everything``'s value.
        lora: LoRA adapters through PEFT (``pip install "corrpo[lora]"``): only the adapters train, the
            inversion is measured on the effective weights ``W + (alpha / r) B A``; unset = full fine-tuning.
        generator: the rollout engine, a :class:`corrpo.generation.rollout.Generator` (class path in a config); None =
            :class:`corrpo.generation.decode_loop.DecodeLoopGenerator` (a lean decode loop, HF ``generate``'s
            outputs; it falls back to :class:`corrpo.generation.rollout.HFGenerator` for families it does not cover);
            :class:`corrpo.generation.rollout.HFGenerator` for ``model.generate`` itself;
            :class:`corrpo.generation.vllm.VLLMGenerator` for vLLM.
        gradient_checkpointing: recompute each decoder layer's activations in the backward (Hugging Face's, with
            ``use_reentrant=False``): activation memory of one layer instead of all, about a third more compute.
            The inversion scoring turns it off for its own pass (exact scores either way).
        eval: when and how to evaluate (:class:`corrpo.training.evaluation.EvalConfig`): every N steps, pass@k / mean@k
            from k samples at a temperature, greedy accuracy, your own eval files, saved generations.
        sharding: FSDP2 options (:class:`corrpo.models.sharding.ShardingConfig`: mixed precision, CPU offload), used
            when ``trainer.strategy`` is Lightning's ``ModelParallelStrategy``: the policy and the KL reference
            are then sharded per decoder layer in :meth:`configure_model`.
    """

    def __init__(
        self,
        policy: str = "tiny-qwen2",
        tiny: TinyArchitecture = TinyArchitecture(),
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        sft: SFTConfig = SFTConfig(),
        rl: RLConfig = RLConfig(),
        use_chat_template: bool = False,
        system_prompt: str | None = None,
        chat_template_kwargs: dict | None = None,
        eval_batch_size: int = 64,
        seed: int | None = None,
        lora: LoRAConfig | None = None,
        generator: Generator | None = None,
        gradient_checkpointing: bool = False,
        eval: EvalConfig = EvalConfig(),  # noqa: B008 - the config key is model.eval
        sharding: ShardingConfig = ShardingConfig(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator"])  # an engine (vLLM) is not a hyperparameter to pickle
        self.automatic_optimization = False
        self.sft = sft
        self.rl = rl
        self.use_chat_template = use_chat_template
        self.prompt_format = PromptFormat(use_chat_template, system_prompt, dict(chat_template_kwargs or {}))
        if eval_batch_size < 1:
            raise ValueError(f"model.eval_batch_size must be >= 1, got {eval_batch_size}")
        self.eval_batch_size = eval_batch_size
        self.seed = seed = seed_or_global(seed)
        # a tiny.tokenizer=bpe policy's tokenizer trains on word-problem traces (called only then; cached by its text)
        corpus = partial(ArithmeticTask(render="words").corpus, tiny.corpus_records)
        self.policy, self.tokenizer = load_policy(policy, tiny, dtype, attn_implementation, seed, corpus)
        prompt_position_budget(self.policy.config, rl.sampling.max_new_tokens)  # no room for prompts: refused now
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)
        if lora is not None:
            self.policy = apply_lora(self.policy, lora, seed)
        self.grpo = GRPOStep(self.rl, reward_functions(self.rl.rewards))
        self.schedule = PhaseSchedule(sft.steps, rl.steps)
        self.generator: Generator = generator if generator is not None else DecodeLoopGenerator()
        self._generator_stale = False  # the policy changed since the generator last synced its weights
        # The KL reference is the policy as RL starts (refreshed at the boundary); a submodule so that it
        # moves with the module and is saved in checkpoints.
        self.ref_policy = None
        if self.rl.beta > 0:
            self.ref_policy, _ = load_policy(policy, tiny, dtype, attn_implementation, seed, corpus)
            if lora is not None:  # wrapped like the policy, so the boundary refresh is a plain load_state_dict
                self.ref_policy = apply_lora(self.ref_policy, lora, seed)
            self.ref_policy.requires_grad_(False).eval()
        self.skipped_updates, self.skips = 0, SkipStreak()  # skips in all, and in a row (which stop a run)
        self.eval_history: list[dict] = []
        self.eval_config = eval
        self.eval_results: list[dict] = []  # one entry per (evaluation point, eval set): pass@k, mean@k, greedy
        self.evaluator = Evaluator(eval, self.eval_context)
        self._data: HeldOutData | None = None  # the Trainer's data module, checked at setup
        self.last_completions: list[dict] = []  # this rank's last RL batch, one row per completion
        self.steps_done = 0  # train batches finished; where a resumed run starts
        self._rng_to_restore: dict | None = None
        self.sharding = sharding
        self._lora = lora is not None

    def setup(self, stage: str) -> None:
        """Check the Trainer's data module once (:class:`corrpo.training.host.HeldOutData`); without one there is
        nothing to evaluate on. Under ``trainer.fast_dev_run`` shorten the run to a batch of each phase."""
        datamodule = self.trainer.datamodule
        self._data = None if datamodule is None else require_held_out_data(datamodule, "CorrPOModule")
        self.schedule = trainer_state.run_schedule(self.trainer, PhaseSchedule(self.sft.steps, self.rl.steps))

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (which sets ``device_mesh``): shard the policy and the KL reference
        with FSDP2, per decoder layer then the root (:func:`corrpo.models.sharding.shard_policies`); else nothing."""
        shard_policies(self.device_mesh, self.sharding, self._lora, self.policy, self.ref_policy)

    # ----------------------------------------------------------------------------------------- phases
    @property
    def collectives(self) -> Collectives:
        """The cross-rank reductions of this run (the identity outside a Trainer or on one process)."""
        return LightningCollectives(self) if self._trainer is not None else SINGLE_PROCESS

    def configure_optimizers(self):
        # with model.lora only the adapters require grad: the frozen base gets no AdamW state
        params = [p for p in self.policy.parameters() if p.requires_grad]
        sft_opt = adamw(params, lr=self.sft.lr, weight_decay=self.sft.weight_decay)
        rl_opt = adamw(params, lr=self.rl.lr, weight_decay=self.rl.weight_decay)
        return [sft_opt, rl_opt]

    def release_sft_optimizer(self) -> None:
        """Drop the SFT AdamW moments (8 bytes a parameter) as RL starts: RL has its own optimizer, so one state is
        alive at a time and a checkpoint holds one. A run resumed in the RL phase restores the empty SFT state, one
        resumed before the boundary releases it at the same batch: exact resume holds on both sides."""
        sft_opt, _ = self.optimizers(use_pl_optimizer=False)
        sft_opt.state.clear()

    def on_fit_start(self) -> None:
        """Put the reward models on the policy's device, then dry-run every reward on a few RL records
        (:func:`corrpo.rewards.dry_run.dry_run_rewards`): a broken reward stops the run here, before SFT."""
        place_rewards(self.grpo.reward_fns.values(), self.device)
        if self.rl.steps and self.rl.reward_dry_run and self._data is not None:
            summary = dry_run_rewards(
                self.grpo.reward_fns, self._data.rl_records(),
                encode=lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"],
                trainer_state=StepInfo(self.schedule.sft_steps, self.schedule.total, 0),
            )  # fmt: skip
            rank_zero_info(f"[corrpo] {summary}")

    def on_train_start(self) -> None:
        if self.steps_done == 0:  # a resumed run measured its start already
            self.evaluate_and_log("start")
        else:  # unfinished again; the eval rows written after its checkpoint, this run writes again
            run_folder(self.trainer).reopen(self.eval_history, rank=self.global_rank)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if batch["step"] != self.steps_done:
            raise RuntimeError(
                f"batch of step {batch['step']} arrived after {self.steps_done} finished steps: the train loader "
                "must be the data module's step stream (it starts where a resumed run stopped)"
            )
        self._restore_rng()
        trainer_state.forget_earlier_step_metrics(self.trainer)  # a row holds its own step's keys: no sft/loss in RL
        step, every = batch["step"], self.eval_config.every_n_steps
        if self.schedule.is_boundary(step):
            self.evaluate_and_log("sft_end")
            self._export_to(run_folder(self.trainer).policy_sft)  # no later crash or broken reward loses SFT
        elif every and step and step % every == 0 and step != self.schedule.sft_steps:
            self.evaluate_and_log("periodic")  # before this batch, after the last one's checkpoint: resumes redo it
        if self.schedule.starts_rl(batch["step"]):
            self.release_sft_optimizer()
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

    def _restore_rng(self) -> None:
        """Put a resumed run's RNG states back once: before its first batch, or as it ends when it resumed at its last
        step (the final checkpoint: no batch left, Lightning runs no epoch-end hook; the end's evaluation is left)."""
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_end(self) -> None:
        """Evaluate the end, export ``policy/``, then write results.json (both atomic; results.json last marks a
        finished run). A run killed in here resumes from its final checkpoint and does this again."""
        self._restore_rng()
        self.evaluate_and_log("end")
        run = run_folder(self.trainer)
        folder = self._export_to(run.policy)
        if self.trainer.is_global_zero:
            run.write_results(
                {
                    **trainer_state.phases_run(self.trainer, self.schedule, self.steps_done, self.sft.steps, self.rl),
                    "seeds": self.seeds(),
                    "test_accuracy": self.eval_history,
                    "eval": self.eval_results,
                    "eval_settings": asdict(self.eval_config),
                    "skipped_updates": self.skipped_updates,
                }
            )
            rank_zero_info(f"[corrpo] policy exported to {folder}")

    def _export_to(self, folder: Path) -> Path:
        """Export the policy to ``folder`` atomically (sharded: every rank gathers the full weights, rank 0 writes)."""
        state = full_state_dict(self.policy) if is_sharded(self.policy) else None
        if self.trainer.is_global_zero:
            export = partial(export_policy, self.policy, self.tokenizer, state_dict=state)  # export(folder)
            run_folder(self.trainer).write_policy(folder, export)
        return folder

    def seeds(self) -> dict[str, int | None]:
        """The seeds of this run: ``seed_everything`` (Lightning's global seed), the model's and the data's."""
        global_seed = os.environ.get("PL_GLOBAL_SEED")
        return {
            "seed_everything": int(global_seed) if global_seed is not None else None,
            "model": self.seed,
            "data": self._data.seed if self._data is not None else None,
        }

    # -------------------------------------------------------------------------------------- updates
    def _log_update(self, update: UpdateOutcome, section: str) -> None:
        """Count and warn about a skipped update; log the gradient norm and lr of an applied one (``sft/`` or
        ``rl/``)."""
        self.skipped_updates += self.skips.record(update, getattr(self, section), section, self.global_step)  # warns
        if not update.applied:
            trainer_state.count_skipped_update(self.trainer)  # global_step counts every update, applied or skipped
            self._log_step("skipped_updates", float(self.skipped_updates))
            return
        self._generator_stale = True
        self._log_step(f"{section}/grad_norm", update.grad_norm)
        self._log_step(f"{section}/lr", update.lr)

    def _log_step(self, key: str, value, prog_bar: bool = False) -> None:
        """Log a per-step scalar; under DDP the mean over ranks (every rank logs the same keys in order)."""
        self.log(key, value, on_step=True, prog_bar=prog_bar, batch_size=1, sync_dist=self.trainer.world_size > 1)

    def _sft_step(self, batch: dict) -> None:
        sft_opt, _ = self.optimizers()
        context = SFTContext(
            self.policy, self.tokenizer, sft_opt, self.prompt_format, self.collectives, self.manual_backward
        )
        result = sft_step(context, self.sft, batch["prompt"], batch["completion"], batch["step"])
        self._log_update(result.update, "sft")
        self._log_step("sft/loss", result.loss, prog_bar=True)

    # ----------------------------------------------------------------------------------------- RL
    def generate_rollout(
        self, prompts: list, num_generations: int, greedy: bool = False, sampling: SamplingConfig | None = None
    ) -> Rollout:
        """``num_generations`` completions per prompt (text or message lists, rendered by
        :func:`corrpo.models.batching.format_prompt` with :attr:`prompt_format`; ``sampling``: default ``rl.sampling``),
        ``rl.generation_batch_size`` completions (whole groups) per generate call; the prompts are encoded together,
        so every chunk shares one prompt width."""
        budget = prompt_position_budget(self.policy.config, (sampling or self.rl.sampling).max_new_tokens)
        enc = encode_prompts(self.tokenizer, prompts, self.rl.max_prompt_length, self.prompt_format, budget)
        if self._generator_stale:  # e.g. vLLM holds its own copy of the weights: refresh it after updates
            self.generator.sync_weights(self.policy)
            self._generator_stale = False
        per_call = self.rl.generation_batch_size
        prompts_per_call = len(prompts) if per_call is None else max(1, per_call // num_generations)
        rollouts = [
            self.generator.generate(
                self.policy,
                enc["input_ids"][rows].to(self.device),
                enc["attention_mask"][rows].to(self.device),
                num_generations,
                sampling if sampling is not None else self.rl.sampling,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                greedy=greedy,
            )
            for rows in row_chunks(len(prompts), prompts_per_call)
        ]
        return concat_rollouts(rollouts, self.tokenizer.pad_token_id)

    def decode_completions(self, rollout: Rollout) -> list[str]:
        ids = rollout.completion_ids.masked_fill(~rollout.completion_mask, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def rl_context(self, optimizer: torch.optim.Optimizer | None = None) -> RLContext:
        """What :class:`corrpo.training.grpo.GRPOStep` acts on: the policy, the RL optimizer (default: this
        module's), this module's sampling and decoding, the KL reference, the ranks, the data's extra prompts."""
        return RLContext(
            policy=self.policy,
            optimizer=optimizer if optimizer is not None else self.optimizers()[1],
            generate=self.generate_rollout,
            decode=self.decode_completions,
            ref_policy=self.ref_policy,
            collectives=self.collectives,
            backward=self.manual_backward if self._trainer is not None else torch.Tensor.backward,
            more_prompts=getattr(self._data, "next_rl_round", None), pad_token_id=self.tokenizer.pad_token_id,
        )  # fmt: skip

    def _rl_step(self, batch: dict) -> None:
        rl_index = self.schedule.rl_index(batch["step"])
        result = self.grpo(
            self.rl_context(), batch["prompt"], batch["answer"], rl_index, batch["step"],
            columns=batch.get("columns"), max_steps=self.schedule.total,
        )  # fmt: skip
        self.last_completions = result.completions
        for update in result.updates:
            self._log_update(update, "rl")
        # TRL's names (reward, rewards/<f>/mean, kl, ...) inside the rl/ section, apart from SFT's loss and lr
        for key, value in result.metrics.items():
            self._log_step(f"rl/{key}", value, prog_bar=key in ("reward", "loss"))

    # ------------------------------------------------------------------------------------- evaluation
    def eval_context(self) -> EvalContext:
        """What :attr:`evaluator` acts on now: this module's rollouts, ranks and device, the Trainer's loggers and
        progress bars (none outside a Trainer)."""
        return EvalContext(
            generate=self.generate_rollout,
            decode=self.decode_completions,
            sampling=self.rl.sampling,
            batch_size=self.eval_batch_size,
            collectives=self.collectives,
            device=self.device,
            sharded=is_sharded(self.policy),
            log=self._log_eval,
            progress=partial(eval_progress, self._trainer),
        )

    def evaluate_and_log(self, when: str) -> float | None:
        """Measure test accuracy now, log it as ``eval/test_accuracy`` and keep it for ``results.json``; then
        the ``model.eval`` suite (pass@k / mean@k, the eval files) and the generations file
        (:class:`corrpo.training.evaluation.Evaluator`). Nothing without a data module."""
        if self._data is None:
            return None
        test = self.evaluator.test_split(when, self.global_step, self._data.test_records())
        self.eval_history.append(test.entry)
        self._log_eval({"eval/test_accuracy": test.accuracy})
        rank_zero_info(f"[corrpo] test accuracy at {when} (step {self.global_step}): {test.accuracy:.3f}")
        sets = self.evaluator.eval_sets(self._load_eval_file)
        entries, generations = self.evaluator.suite(when, self.global_step, test, sets)
        self.eval_results.extend(entries)
        if self.eval_config.save_generations and generations:
            run_folder(self.trainer).append_eval_generations(generations, rank=self.global_rank)
        return test.accuracy

    def _load_eval_file(self, source: str) -> list[dict]:
        """The records of one ``model.eval.files`` source, read with ``data.rl_fields``."""
        return load_records(source, kind="rl", fields=self._data.fields.get("rl")).records

    def _log_eval(self, metrics: dict[str, float]) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        records = [{"prompt": p, "answer": a} for p, a in zip(batch["prompt"], batch["answer"], strict=True)]
        self.log("val/accuracy", self.evaluator.test_accuracy(records), batch_size=len(records))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        records = [{"prompt": p, "answer": a} for p, a in zip(batch["prompt"], batch["answer"], strict=True)]
        self.log("test/accuracy", self.evaluator.test_accuracy(records), batch_size=len(records))

    # ------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["corrpo"] = {
            "skipped_updates": self.skipped_updates,
            "eval_history": self.eval_history,
            "eval_results": self.eval_results,
            "steps_done": self.steps_done,
            "rng": rng_states(),
        }
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank samples from its own streams: keep each rank's (rank 0 alone writes the metadata)
            by_rank: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(by_rank, checkpoint["corrpo"]["rng"])
            checkpoint["corrpo"]["rng_by_rank"] = by_rank

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("corrpo", {})
        self.skipped_updates = state.get("skipped_updates", 0)
        self.eval_history = state.get("eval_history", [])
        self.eval_results = state.get("eval_results", [])
        self.steps_done = state.get("steps_done", 0)
        trainer_state.reopen_finished_epoch(checkpoint, self.steps_done, self.schedule.total)  # --extend: go on
        self._generator_stale = True  # the restored weights are not what a generator may have synced
        by_rank = state.get("rng_by_rank")
        same_world = by_rank is not None and self._trainer is not None and len(by_rank) == self.trainer.world_size
        self._rng_to_restore = by_rank[self.global_rank] if same_world else state.get("rng")
