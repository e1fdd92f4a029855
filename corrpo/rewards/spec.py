"""``rl.rewards`` entries: a string (registry name or import path) or a mapping that builds a reward.

The mapping forms, in YAML::

    rewards:
      - accuracy                                            # a registry name or 'pkg.mod:fn', as before
      - {function: trl.rewards:get_soft_overlong_punishment, # a factory: called with kwargs to build the reward
         kwargs: {max_completion_len: 64, soft_punish_cache: 16}, name: overlong}
      - {function: mypkg.scores:compute_score, style: verl}  # verl's compute_score(data_source, solution_str, ...)
      - {model: path/to/reward_model, name: rm, batch_size: 16}  # a sequence classifier, as TRL's reward models

``kwargs`` given (even ``{}``) means ``function(**kwargs)`` returns the reward; without it ``function`` is the reward.
``style: verl`` wraps the (built) function in :class:`corrpo.rewards.verl.VerlReward`; ``model`` loads a
:class:`corrpo.rewards.reward_model.RewardModel`. ``name`` is the short name logged as ``rewards/<name>/mean``
(default: the function's name after the last ``:`` or ``.``, or the model folder's name).

An entry is checked by :func:`parse_reward_spec` when the config is built (``RLConfig``): a wrong key or value is a
ValueError naming it (``rl.rewards[1].kwargs``) and listing what is accepted. Importing and building happens in
:func:`reward_functions`, when the module is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import PurePath
from typing import Any

from corrpo.rewards.call import RewardFn
from corrpo.rewards.registry import resolve_reward, reward_name
from corrpo.rewards.reward_model import REWARD_MODEL_DTYPES, RewardModel
from corrpo.rewards.verl import VerlReward

STYLES = ("trl", "verl")
"""How a function is called: ``trl`` (by keyword, as TRL's GRPOTrainer calls rewards) or ``verl`` (per sample,
``compute_score(data_source, solution_str, ground_truth, extra_info)``)."""


@dataclass(frozen=True)
class RewardSpec:
    """One ``rl.rewards`` entry in its mapping form: a function (maybe a factory, maybe verl-style) or a model."""

    function: str | None = None
    """Registry name or import path (``pkg.module:function``) of the reward, or of its factory with ``kwargs``."""
    kwargs: dict[str, Any] | None = None
    """Given: ``function(**kwargs)`` builds the reward (a factory such as TRL's ``get_soft_overlong_punishment``)."""
    name: str | None = None
    """Short name in the logs (``rewards/<name>/mean``) and completion rows."""
    style: str = "trl"
    """``trl`` (keyword call, one value per sample) or ``verl`` (``compute_score`` per sample)."""
    ground_truth: str = "answer"
    """verl: the column passed as ``ground_truth`` (``reward_model.ground_truth`` reads a key of a dict column)."""
    data_source: str = "corrpo"
    """verl: the ``data_source`` of records without a ``data_source`` column."""
    model: str | None = None
    """A local folder holding a sequence classifier (``num_labels=1``) and its tokenizer: a reward model."""
    batch_size: int = 16
    """Reward model: texts per forward."""
    dtype: str | None = None
    """Reward model: ``float32``, ``bfloat16`` or ``float16``; None = ``from_pretrained``'s default."""


SPEC_KEYS = tuple(f.name for f in fields(RewardSpec))
FUNCTION_KEYS = ("function", "kwargs", "name", "style")
VERL_KEYS = ("ground_truth", "data_source")
MODEL_KEYS = ("model", "name", "batch_size", "dtype")
ACCEPTED = (
    "a registry name or import path (string), or a mapping {function, kwargs, name, style} (style: verl adds "
    "ground_truth, data_source) or {model, name, batch_size, dtype}"
)


class RewardConfigError(ValueError):
    """An ``rl.rewards`` entry that cannot become a reward (malformed, not importable, a factory that fails, a model
    folder that does not load): the message names the key; the CLI prints it without a traceback."""


def _fail(key: str, why: str) -> RewardConfigError:
    return RewardConfigError(f"{key}: {why}; an rl.rewards entry is {ACCEPTED}")


def _check_string(key: str, value: Any, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise _fail(key, f"expected a non-empty string, got {value!r}")


def parse_reward_spec(entry: Any, key: str = "rl.rewards[0]") -> RewardSpec:
    """``entry`` (a string, a mapping or a :class:`RewardSpec`) as a checked :class:`RewardSpec`.

    Raises:
        ValueError: naming ``<key>.<field>`` and listing the accepted forms.
    """
    if isinstance(entry, RewardSpec):
        entry = {f: getattr(entry, f) for f in SPEC_KEYS if getattr(entry, f) != getattr(RewardSpec(), f)}
    if isinstance(entry, str):
        _check_string(key, entry)
        return RewardSpec(function=entry)
    if not isinstance(entry, Mapping):
        raise _fail(key, f"got {type(entry).__name__} {entry!r:.80}")
    unknown = [k for k in entry if k not in SPEC_KEYS]
    if unknown:
        raise _fail(f"{key}.{unknown[0]}", f"unknown key {unknown[0]!r}")
    if ("function" in entry) == ("model" in entry):
        raise _fail(key, "give exactly one of 'function' and 'model'")
    allowed = MODEL_KEYS if "model" in entry else FUNCTION_KEYS + (VERL_KEYS if entry.get("style") == "verl" else ())
    for k in entry:
        if k not in allowed:
            what = "a reward model ('model')" if "model" in entry else f"style {entry.get('style', 'trl')!r}"
            raise _fail(f"{key}.{k}", f"{k!r} does not apply to {what}")
    for k in ("function", "model", "name", "ground_truth"):
        if k in entry:
            _check_string(f"{key}.{k}", entry[k])
    if "data_source" in entry:
        _check_string(f"{key}.data_source", entry["data_source"], allow_empty=True)
    kwargs = entry.get("kwargs")
    if "kwargs" in entry and (not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs)):
        raise _fail(f"{key}.kwargs", f"expected a mapping of argument names to values, got {kwargs!r:.80}")
    if entry.get("style", "trl") not in STYLES:
        raise _fail(f"{key}.style", f"expected one of {list(STYLES)}, got {entry['style']!r}")
    batch_size = entry.get("batch_size", 1)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise _fail(f"{key}.batch_size", f"expected a positive int, got {batch_size!r}")
    if entry.get("dtype") is not None and entry["dtype"] not in REWARD_MODEL_DTYPES:
        raise _fail(f"{key}.dtype", f"expected one of {list(REWARD_MODEL_DTYPES)} or null, got {entry['dtype']!r}")
    values = dict(entry)
    if kwargs is not None:
        values["kwargs"] = dict(kwargs)
    return RewardSpec(**values)


def spec_name(spec: RewardSpec) -> str:
    """The short name of a reward: ``name``, else the function's (after its last ``:`` or ``.``), else the model
    folder's."""
    if spec.name is not None:
        return spec.name
    if spec.model is not None:
        return PurePath(spec.model.rstrip("/")).name or spec.model
    return reward_name(spec.function)


def build_reward(spec: RewardSpec, key: str = "rl.rewards[0]", function_key: str | None = None) -> RewardFn:
    """The reward function ``spec`` describes: imported, built by its factory, wrapped for verl, or a loaded model.

    Raises:
        RewardConfigError: not importable, a factory that raised or returned no callable, a model folder that does
            not load; each naming ``key`` (an import error names ``function_key``, default ``<key>.function``).
    """
    if spec.model is not None:
        try:
            return RewardModel(spec.model, batch_size=spec.batch_size, dtype=spec.dtype)
        except (OSError, ValueError) as err:
            raise RewardConfigError(f"{key}.model: cannot load the reward model {spec.model!r}: {err}") from err
    try:
        fn = resolve_reward(spec.function)
    except ValueError as err:
        raise RewardConfigError(f"{function_key or key + '.function'}: {err}") from err
    if spec.kwargs is not None:
        try:
            fn = fn(**spec.kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of a user's factory is a config error naming it
            raise RewardConfigError(
                f"{key}.kwargs: building the reward {spec.function}(**{spec.kwargs}) failed: {err!r}"
            ) from err
        if not callable(fn):
            raise RewardConfigError(
                f"{key}.kwargs: {spec.function}(**kwargs) returned {type(fn).__name__}, not a reward function; "
                "without kwargs the function itself is the reward"
            )
    if spec.style == "verl":
        fn = VerlReward(fn, ground_truth=spec.ground_truth, data_source=spec.data_source, name=spec_name(spec))
    return fn


def reward_functions(entries: Sequence[Any]) -> dict[str, RewardFn]:
    """``rl.rewards`` (strings, mappings or :class:`RewardSpec`) built, keyed by short name; two rewards with one short
    name are an error, since their scores and logs would overwrite each other."""
    functions: dict[str, RewardFn] = {}
    for i, entry in enumerate(entries):
        key = f"rl.rewards[{i}]"
        spec = parse_reward_spec(entry, key)
        short = spec_name(spec)
        if short in functions:
            raise RewardConfigError(
                f"rl.rewards: two rewards are named {short!r} ({list(entries)}); give one another name "
                f"({key}: {{function: ..., name: <short name>}})"
            )
        functions[short] = build_reward(spec, key, key if isinstance(entry, str) else None)
    return functions
