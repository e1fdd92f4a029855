"""ReasoningDataModule: SFT batches in phase 1, RL prompt batches in phase 2, held-out probe and test sets.

The train loader is a map-style dataset of exactly ``sft_steps + rl_steps`` *batches*: item ``i`` is an
SFT batch (prompt, completion) when ``i < sft_steps`` and a batch of RL prompts (prompt, answer) after.
Each batch is a pure function of ``(seed, i)``: records are drawn by a per-epoch permutation of the pool,
so a step can be reproduced from its index alone (resume, DDP) and the phase boundary is an index. The extra RL
prompts of dynamic sampling (``model.rl.dynamic_sampling``) come from a stream of their own
(:meth:`ReasoningDataModule.next_rl_round`), whose position is the data module's checkpointed state.

Sources: ``"arithmetic"`` (the embedded offline task, :mod:`corrpo.data.arithmetic`), a reasoning-gym task
``"reasoning_gym:<name>"`` for RL and test prompts (:mod:`corrpo.data.reasoning_gym_source`), or a
jsonl/parquet path, ``save_to_disk`` folder or Hugging Face dataset ``name[:config][[split]]``
(:mod:`corrpo.data.records`; prompts and completions are text or TRL's conversational message lists, carried as
they are to the module, which renders them). Probe
traces (for the inversion tracker) and test prompts (for accuracy) never overlap the training records: the
generated tasks split by hash, user data holds the last records of a seeded shuffle out.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import replace
from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset

from corrpo.data.arithmetic import ArithmeticTask
from corrpo.data.reasoning_gym_source import reasoning_gym_records, task_name
from corrpo.data.records import load_records
from corrpo.training.host import require_even_split, require_host, seed_or_global

EMBEDDED = "arithmetic"


class StepBatches(Dataset):
    """``len = sft_steps + rl_steps``; item ``i`` is the whole batch of step ``i`` (dict of lists)."""

    def __init__(
        self,
        sft_records: list[dict],
        rl_records: list[dict],
        sft_steps: int,
        rl_steps: int,
        sft_batch_size: int,
        rl_batch_size: int,
        seed: int,
    ) -> None:
        if sft_steps and not sft_records:
            raise ValueError("data: sft_steps > 0 but the SFT source has no records")
        if rl_steps and not rl_records:
            raise ValueError("data: rl_steps > 0 but the RL source has no records")
        self.sft_records, self.rl_records = sft_records, rl_records
        self.sft_steps, self.rl_steps = sft_steps, rl_steps
        self.sft_batch_size, self.rl_batch_size = sft_batch_size, rl_batch_size
        self.seed = seed
        self._orders: dict[tuple[str, int], list[int]] = {}

    def __len__(self) -> int:
        return self.sft_steps + self.rl_steps

    def _order(self, size: int, salt: str, epoch: int) -> list[int]:
        key = (salt, epoch)
        if key not in self._orders:
            order = list(range(size))
            random.Random(f"{self.seed}-{salt}-{epoch}").shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def _draw(self, pool: list[dict], step: int, batch_size: int, salt: str) -> list[dict]:
        """Records ``step*bs .. (step+1)*bs`` of the endless stream of seeded per-epoch permutations."""
        out = []
        for k in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(k, len(pool))
            out.append(pool[self._order(len(pool), salt, epoch)[offset]])
        return out

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < self.sft_steps:
            rows = self._draw(self.sft_records, index, self.sft_batch_size, "sft")
            return {
                "phase": "sft",
                "step": index,
                "prompt": [r["prompt"] for r in rows],
                "completion": [r["completion"] for r in rows],
            }
        rows = self._draw(self.rl_records, index - self.sft_steps, self.rl_batch_size, "rl")
        return {"phase": "rl", "step": index, **rl_fields(rows)}

    def extra_rl_round(self, round_index: int) -> dict:
        """Round ``round_index`` of dynamic sampling's extra RL prompts (``rl_batch_size`` of them, a step's batch
        without its ``step``): a stream of their own, seeded per-epoch permutations of the RL pool salted apart from
        the steps' (so a step's batch stays a function of its index, whatever was drawn before it)."""
        return {"phase": "rl", **rl_fields(self._draw(self.rl_records, round_index, self.rl_batch_size, "rl-extra"))}


def rl_fields(rows: list[dict]) -> dict:
    """An RL batch's lists: prompts, gold answers (as text) and the other dataset columns."""
    return {
        "prompt": [r["prompt"] for r in rows],
        "answer": [str(r["answer"]) for r in rows],
        "columns": dataset_columns(rows),
    }


def dataset_columns(rows: list[dict]) -> dict[str, list]:
    """The records' non-canonical columns (kept by ``load_records(keep_columns=True)``), one value per row (None
    where a row lacks it): what a TRL-style reward gets by keyword besides ``prompts``/``completions``/``answer``."""
    names = dict.fromkeys(key for row in rows for key in row if key not in ("prompt", "completion", "answer"))
    return {name: [row.get(name) for row in rows] for name in names}


def prompt_key(prompt: str | list[dict]) -> str:
    """A prompt as a hashable key (a message list, TRL's conversational prompt, as its canonical JSON): how held-out
    probe and test prompts are found in the training pools."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def shard_batch(batch: dict, rank: int, world_size: int) -> dict:
    """This rank's contiguous share of a step batch: rows ``[rank*b/W, (rank+1)*b/W)`` of every list field.

    RL prompts are cut whole and each is sampled G times on the rank that holds it, so a group never spans
    two ranks and group advantages need no communication. The batch size must divide evenly: unequal shares
    would weight ranks unequally in DDP's gradient average.
    """
    if world_size == 1:
        return batch
    rows = len(batch["prompt"])
    require_even_split("data.sft_batch_size" if batch["phase"] == "sft" else "data.rl_batch_size", rows, world_size)
    per_rank = rows // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank

    def share(value):
        if isinstance(value, dict):  # the dataset columns: a list per column
            return {name: share(values) for name, values in value.items()}
        return value[lo:hi] if isinstance(value, list) else value

    return {k: share(v) for k, v in batch.items()}


class StepStream(IterableDataset):
    """Steps ``start, start+1, ...`` of a :class:`StepBatches`, each cut to this rank's share.

    An iterable (not map-style) dataset so that Lightning neither restarts it at step 0 on resume nor wraps it
    in a DistributedSampler (which would hand whole steps to different ranks and break the phase order).
    ``len`` is the whole run, as Lightning counts a resumed epoch's batches from where it stopped.
    """

    def __init__(self, steps: StepBatches, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= start <= len(steps):
            raise ValueError(f"cannot resume at step {start} of a run of {len(steps)} steps")
        self.steps, self.start, self.rank, self.world_size = steps, start, rank, world_size

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        for index in range(self.start, len(self.steps)):
            yield shard_batch(self.steps[index], self.rank, self.world_size)


def _collate_records(rows: list[dict]) -> dict:
    """Val/test batches as lists (not torch's default collate, which would turn message-list prompts into lists of
    dicts of tuples)."""
    return {"prompt": [r["prompt"] for r in rows], "answer": [str(r["answer"]) for r in rows]}


def _identity(batch: dict) -> dict:
    return batch


class ReasoningDataModule(L.LightningDataModule):
    """Serves step batches for SFT then RL, plus probe traces and test prompts.

    Args:
        sft_source: ``arithmetic`` or a jsonl/parquet path or HF dataset name with prompt + completion.
        rl_source: ``arithmetic``, ``reasoning_gym:<task>`` or a source with prompt + answer.
        test_source: prompts + answers for accuracy; None = held out of ``rl_source`` (a generated task,
            embedded or reasoning-gym, generates its own held-out test problems).
        probe_source: prompt + completion traces for the inversion tracker; None = held out of ``sft_source``.
        sft_fields: canonical field -> column name for SFT/probe sources (e.g. ``{"completion": "solution"}``).
        rl_fields: the same for RL/test sources (e.g. ``{"prompt": "question", "answer": "final"}``).
        on_error: ``raise`` on a malformed row (naming file and line) or ``skip`` and count it.
        arithmetic: the embedded task (seed, min_ops, max_ops, max_operand, ops, max_value); its unset seed takes
            ``seed_everything``'s value.
        n_train: training problems of a generated task: the embedded one (shared by SFT traces and RL
            prompts) or a reasoning-gym one.
        sft_steps / rl_steps: batches per phase (linked from the model's ``sft.steps`` / ``rl.steps``); in a Trainer
            the module's schedule decides (the same, except under ``trainer.fast_dev_run``: a batch of each phase).
        sft_batch_size: traces per SFT step.
        rl_batch_size: prompts per RL step (each sampled G times).
        n_probe: size of the probe set (held-out traces the inversion tracker measures on).
        n_test: size of the test set (held-out prompts for accuracy).
        eval_batch_size: prompts per val/test batch.
        seed: seed of the batch order and of held-out splits of user data; None (the default): ``seed_everything``'s
            value (0 when nothing was seeded).
    """

    def __init__(
        self,
        sft_source: str = EMBEDDED,
        rl_source: str = EMBEDDED,
        test_source: str | None = None,
        probe_source: str | None = None,
        sft_fields: dict[str, str] | None = None,
        rl_fields: dict[str, str] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        arithmetic: ArithmeticTask = ArithmeticTask(),
        n_train: int = 4000,
        sft_steps: int = 0,
        rl_steps: int = 0,
        sft_batch_size: int = 32,
        rl_batch_size: int = 8,
        n_probe: int = 32,
        n_test: int = 200,
        eval_batch_size: int = 100,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        sizes = dict(
            sft_batch_size=sft_batch_size, rl_batch_size=rl_batch_size, n_test=n_test, eval_batch_size=eval_batch_size
        )
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        self.sft_source, self.rl_source = sft_source, rl_source
        self.test_source, self.probe_source = test_source, probe_source
        self.fields = {"sft": sft_fields, "rl": rl_fields}
        self.on_error = on_error
        self.arithmetic = arithmetic if arithmetic.seed is not None else replace(arithmetic, seed=seed_or_global(None))
        self.n_train = n_train
        self.sft_steps, self.rl_steps = sft_steps, rl_steps
        self.sft_batch_size, self.rl_batch_size = sft_batch_size, rl_batch_size
        self.n_probe, self.n_test, self.eval_batch_size = n_probe, n_test, eval_batch_size
        self.seed = seed_or_global(seed)
        self.n_skipped = 0
        self._pools: dict[str, list[dict]] | None = None
        self.rl_rounds_drawn = 0  # dynamic sampling's extra RL rounds handed out (checkpointed: state_dict)
        self._extra: tuple[StepBatches, int, int] | None = None  # the train loader's batches, rank, world size

    # ------------------------------------------------------------------------------------- loading
    def _load(self, source: str, kind: str, key: str, test: bool = False) -> list[dict]:
        """The records of ``data.<key>``: a file or HF dataset, or a reasoning-gym task (``n_train`` problems,
        or with ``test`` its ``n_test`` held-out ones)."""
        name = task_name(source)
        if name is not None:
            if kind == "sft":
                raise ValueError(
                    f"data.{key}: {source!r} has prompts and answers but no completions; "
                    "use it as data.rl_source or data.test_source"
                )
            split, n = ("test", self.n_test) if test else ("train", self.n_train)
            return reasoning_gym_records(name, n, seed=self.seed, split=split)
        result = load_records(
            source, kind=kind, fields=self.fields[kind], on_error=self.on_error, keep_columns=kind == "rl"
        )
        self.n_skipped += result.n_skipped
        if not result.records:
            why = (
                f"all {result.n_skipped} rows are malformed (data.on_error=skip); first: {result.errors[0]}"
                if result.n_skipped
                else "it is empty"
            )
            raise ValueError(f"data.{key}: {source} holds no records: {why}")
        if result.n_skipped:
            shown = "; ".join(result.errors[:3])
            warnings.warn(
                f"data.{key}: skipped {result.n_skipped} malformed row(s) of {source} (data.on_error=skip); "
                f"first: {shown}",
                stacklevel=2,
            )
        return result.records

    def _hold_out(self, records: list[dict], n: int, salt: str, key: str) -> tuple[list[dict], list[dict]]:
        """Split off ``n`` records of ``data.<key>`` by a seeded shuffle: (kept, held_out)."""
        if n >= len(records):
            source = getattr(self, key)
            raise ValueError(
                f"data.{key}: cannot hold out {n} {salt} records from the {len(records)} of {source} and keep any to "
                f"train on; give it more records, lower data.n_{salt}, or name a data.{salt}_source"
            )
        order = list(range(len(records)))
        random.Random(f"{self.seed}-holdout-{salt}").shuffle(order)
        held = [records[i] for i in order[:n]]
        kept = [records[i] for i in order[n:]]
        return kept, held

    def pools(self) -> dict[str, list[dict]]:
        """Load every split once: ``sft``, ``rl``, ``probe``, ``test`` record lists."""
        if self._pools is not None:
            return self._pools
        task = self.arithmetic if EMBEDDED in (self.sft_source, self.rl_source) else None
        train = task.records("train", self.n_train) if task else []
        sft = train if self.sft_source == EMBEDDED else self._load(self.sft_source, "sft", "sft_source")
        rl = train if self.rl_source == EMBEDDED else self._load(self.rl_source, "rl", "rl_source")
        if self.probe_source is not None:
            probe = self._load(self.probe_source, "sft", "probe_source")[: self.n_probe]
        elif self.sft_source == EMBEDDED:
            probe = task.records("probe", self.n_probe)
        else:
            sft, probe = self._hold_out(sft, self.n_probe, "probe", "sft_source")
        if self.test_source is not None:
            test = self._load(self.test_source, "rl", "test_source", test=True)[: self.n_test]
        elif self.rl_source == EMBEDDED:
            test = task.records("test", self.n_test)
        elif task_name(self.rl_source) is not None:
            test = self._load(self.rl_source, "rl", "rl_source", test=True)
        else:
            rl, test = self._hold_out(rl, self.n_test, "test", "rl_source")
        # One source for SFT and RL (the HF recipes) holds its test prompts out of RL only and its probe traces
        # out of SFT only: drop every held-out prompt from both training pools so that none is trained on.
        held = {prompt_key(r["prompt"]) for r in probe} | {prompt_key(r["prompt"]) for r in test}
        pools = {}
        for key, records, steps in (("sft", sft, self.sft_steps), ("rl", rl, self.rl_steps)):
            pools[key] = [r for r in records if prompt_key(r["prompt"]) not in held]
            if steps and records and not pools[key]:  # else StepBatches would say "no records" of a full file
                source = getattr(self, f"{key}_source")
                raise ValueError(
                    f"data.{key}_source: {len(records)} read from {source}, all {len(records)} duplicate probe/test "
                    "prompts (held out, so never trained on); use training data distinct from "
                    "data.probe_source / data.test_source"
                )
        sft, rl = pools["sft"], pools["rl"]
        self._pools = {"sft": sft, "rl": rl, "probe": probe, "test": test}
        return self._pools

    def setup(self, stage: str) -> None:
        self.pools()

    def probe_records(self) -> list[dict]:
        """Held-out (prompt, completion, ...) traces for teacher-forced inversion probes."""
        return self.pools()["probe"]

    def test_records(self) -> list[dict]:
        """Held-out (prompt, answer) records for accuracy."""
        return self.pools()["test"]

    def rl_records(self) -> list[dict]:
        """The RL prompt records (prompt, answer, dataset columns): the module dry-runs the rewards on a few."""
        return self.pools()["rl"]

    # --------------------------------------------------------------------------------- dataloaders
    def step_batches(self, sft_steps: int | None = None, rl_steps: int | None = None) -> StepBatches:
        """Every step's whole batch (all ranks together), by index; ``sft_steps`` / ``rl_steps``: default
        ``data.sft_steps`` / ``data.rl_steps``."""
        pools = self.pools()
        sft_steps = self.sft_steps if sft_steps is None else sft_steps
        rl_steps = self.rl_steps if rl_steps is None else rl_steps
        return StepBatches(
            pools["sft"], pools["rl"], sft_steps, rl_steps, self.sft_batch_size, self.rl_batch_size, self.seed
        )

    def train_dataloader(self) -> DataLoader:
        """The step stream, from the module's ``steps_done`` on (0, or where a resumed run stopped), with the phase
        lengths of the module's schedule (``trainer.fast_dev_run`` shortens it to a batch of each phase)."""
        trainer = self.trainer
        start, sft_steps, rl_steps = 0, self.sft_steps, self.rl_steps
        if trainer is not None:
            host = require_host(trainer.lightning_module, "ReasoningDataModule")
            start, sft_steps, rl_steps = host.steps_done, host.schedule.sft_steps, host.schedule.rl_steps
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        for key, size, steps in (("sft_batch_size", self.sft_batch_size, sft_steps),
                                 ("rl_batch_size", self.rl_batch_size, rl_steps)):  # fmt: skip
            if steps:  # here, not at the first batch of the phase
                require_even_split(f"data.{key}", size, world_size)
        stream = StepStream(self.step_batches(sft_steps, rl_steps), start, rank, world_size)
        self._extra = (stream.steps, rank, world_size)
        # Lightning's mid-epoch-resume warning assumes a loader that restarts at batch 0; this one starts at
        # ``steps_done`` (tests/test_resume.py), and its length warning concerns num_workers > 1 only.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        return DataLoader(stream, batch_size=None, collate_fn=_identity)

    def next_rl_round(self) -> dict:
        """The next round of extra RL prompts for ``model.rl.dynamic_sampling`` (this rank's share of
        ``rl_batch_size``, as a step's batch: ``prompt``, ``answer``, ``columns``), from
        :meth:`StepBatches.extra_rl_round`. Every rank draws the same rounds (the module samples them in lockstep);
        the count drawn is saved in checkpoints (:meth:`state_dict`), so a resumed run draws what the uninterrupted
        one would next."""
        steps, rank, world_size = self._extra if self._extra is not None else (self.step_batches(), 0, 1)
        batch = shard_batch(steps.extra_rl_round(self.rl_rounds_drawn), rank, world_size)
        self.rl_rounds_drawn += 1
        return batch

    def state_dict(self) -> dict:
        """Lightning's checkpointed data-module state: the extra RL rounds drawn so far; empty (nothing saved) when
        none was, as in every run without dynamic sampling."""
        return {"rl_rounds_drawn": self.rl_rounds_drawn} if self.rl_rounds_drawn else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rl_rounds_drawn = int(state_dict.get("rl_rounds_drawn", 0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_records(), batch_size=self.eval_batch_size, collate_fn=_collate_records)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
