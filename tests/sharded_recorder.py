"""A test-only callback for tests/test_fsdp2.py: each rank writes how much of the policy it holds.

Imported by the sharded subprocesses (``PYTHONPATH=tests``); ``ShardRecorder`` writes
``<run_dir>/shards-rank<r>.json`` at the start of training: ``{rank, policy_sharded, reference_sharded,
local_numel, full_numel}``, the parameter elements this rank stores against the whole model's.
"""

import json

import lightning as L
from torch.distributed.tensor import DTensor

from corrpo.models.sharding import is_sharded
from corrpo.runs.run_folder import run_dir


class ShardRecorder(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        params = list(pl_module.policy.parameters())
        row = {
            "rank": trainer.global_rank,
            "policy_sharded": is_sharded(pl_module.policy),
            "reference_sharded": pl_module.ref_policy is not None and is_sharded(pl_module.ref_policy),
            "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
            "full_numel": sum(p.numel() for p in params),
        }
        (run_dir(trainer) / f"shards-rank{trainer.global_rank}.json").write_text(json.dumps(row))
