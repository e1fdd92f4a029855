"""Finite numbers, or a clear error: the weights of a policy and the numbers of a config.

A NaN or an infinity that gets into the weights stays there (every later loss is NaN, every update is skipped)
and reaches the checkpoints and the exported policy; one in a config value (``lr: .inf`` in YAML parses as a
float) gets there at the first update. So the places that write or read weights check them with
:func:`nonfinite_tensors`, and every config dataclass checks its float fields with :func:`require_finite_fields`,
so YAML and the command line meet the same rule.

:func:`nonfinite_tensors` is cheap enough to run after every update: one fused norm per (device, dtype) group of
tensors (``torch._foreach_norm``: a NaN or inf element makes its tensor's norm non-finite) and one host sync per
group; only a tensor whose norm is not finite is looked at element by element, since a huge but finite tensor can
overflow its norm (fp16). The answer is exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor


class NonFiniteWeightsError(RuntimeError):
    """Weights hold a NaN or an infinity where finite ones are required (after an update, to save or on load)."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter, the tensor itself otherwise (detached)."""
    tensor = tensor.detach()
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors of ``named`` that hold a NaN or an infinity (this rank's shards of
    sharded ones), in order. Integer and bool tensors are always finite and skipped."""
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            local = _local(tensor)
            if local.numel():
                groups.setdefault((local.device, local.dtype), []).append((name, local))
    bad: set[str] = set()
    for members in groups.values():
        norms = torch.stack(torch._foreach_norm([t for _, t in members]))
        suspect = (~torch.isfinite(norms)).nonzero().flatten().tolist()  # one sync for the group
        bad.update(members[i][0] for i in suspect if not bool(torch.isfinite(members[i][1]).all()))
    return [name for group in groups.values() for name, _ in group if name in bad]


def describe(names: list[str], limit: int = 3) -> str:
    """``'a', 'b', 'c' and 2 more``: the first names of a list of offending tensors."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def require_finite_state(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming ``what`` (``the checkpoint x.ckpt``, ``the export to policy/``)
    and the first offending tensors when any of ``tensors`` is not finite: nothing non-finite is written."""
    bad = nonfinite_tensors(tensors.items())
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write {what}: {len(bad)} weight tensor(s) hold NaN or inf ({describe(bad)}); non-finite "
            "weights are never checkpointed or exported. See the run's log for the update that made them so"
        )


def weight_files(folder: Path, names: list[str]) -> str:
    """Where ``names`` live in a Hugging Face folder: its safetensors index's files for them, else its weight files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({weight_map[n] for n in names if n in weight_map})
        if files:
            return ", ".join(str(folder / f) for f in files)
    files = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(p.name for p in folder.glob("*.bin"))
    return ", ".join(str(folder / f) for f in files) or str(folder)


def require_finite_weights(model: torch.nn.Module, source: str) -> None:
    """On load: raise naming ``source`` (a folder: the weight file) and the tensors when ``model`` holds a NaN or
    inf, instead of a failure far from its cause (a NaN loss, an eigen-solver error at the first probe)."""
    bad = nonfinite_tensors(model.named_parameters())
    bad += nonfinite_tensors(model.named_buffers())
    if bad:
        folder = Path(source)
        where = weight_files(folder, bad) if folder.is_dir() else source
        raise NonFiniteWeightsError(
            f"model.policy {source!r}: {len(bad)} weight tensor(s) hold NaN or inf ({describe(bad)}) in {where}; "
            "a policy must have finite weights (was it exported from a run whose updates diverged?)"
        )


def nonfinite_fields(values: Mapping[str, object], prefix: str = "") -> list[str]:
    """``prefix.key=value`` (``prefix.key[i]`` in lists, nested mappings walked) of every float that is NaN or
    +-inf. A mapping under a key named ``kwargs`` or ``*_kwargs`` (a reward factory's, a chat template's) holds
    arguments of someone else's code, where inf may mean something: it is not walked."""
    found = []
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if str(key) == "kwargs" or str(key).endswith("_kwargs"):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{name}={value}")
        elif isinstance(value, Mapping):
            found += nonfinite_fields(value, name)
        elif isinstance(value, list | tuple):
            found += nonfinite_fields({f"{key}[{i}]": v for i, v in enumerate(value)}, prefix)
    return found


def require_finite_fields(config: object, section: str) -> None:
    """Raise a ValueError naming ``section.<key>`` when a float field of the dataclass ``config`` (or a float in a
    list field, e.g. ``rl.reward_weights``) is NaN or +-inf: YAML's ``.inf`` / ``.nan`` and a literal too large for
    a float (``1e400``) parse as floats, and comparisons such as ``lr > 0`` let inf through and NaN fail unclearly."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values = {k: v for k, v in values.items() if not dataclasses.is_dataclass(v)}  # nested configs check themselves
    bad = nonfinite_fields(values, section)
    if bad:
        raise ValueError(non_finite_message(bad))


def non_finite_message(found: list[str]) -> str:
    """The error for :func:`nonfinite_fields`' answer: the first key, its value, how many more."""
    key, value = found[0].split("=", 1)
    more = f" (and {', '.join(found[1:])})" if len(found) > 1 else ""
    return (
        f"{key} must be a finite number, got {value}{more}: YAML's .inf / .nan and literals beyond a float's range "
        "(1e400) are not accepted anywhere a number is"
    )
