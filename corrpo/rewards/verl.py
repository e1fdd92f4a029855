"""verl's reward functions, unmodified, as corrpo rewards: ``compute_score`` called once per sample.

verl (``verl/utils/reward_score/__init__.py``, ``default_compute_score``) scores one sample at a time::

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

returning a number or a dict holding ``"score"`` (and other values verl keeps as extra columns). Its reward manager
passes them by keyword from the dataset: ``data_source`` (a column), the decoded response, the record's
``reward_model.ground_truth`` and ``extra_info`` (a column). :class:`VerlReward` does the same from corrpo's columns:
``data_source`` from a ``data_source`` column (else a configured default), ``solution_str`` the completion's text
(its message content for conversational data), ``ground_truth`` from a configured column (``answer`` by default; a
dotted ``reward_model.ground_truth`` reads a key of a dict column, as verl's parquet files hold it), ``extra_info``
from an ``extra_info`` column when the records have one (else None). A dict's other keys go to the completions table
(``log_extra``) as ``<name>/<key>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from corrpo.rewards.call import completion_text

NOT_COLUMNS = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
"""The keywords a reward gets that are not dataset columns."""


class VerlReward:
    """A verl ``compute_score`` as a reward called the TRL way (one value per sample, None where it returns None)."""

    def __init__(
        self, compute_score: Callable, ground_truth: str = "answer", data_source: str = "corrpo", name: str = "verl"
    ) -> None:
        self.compute_score = compute_score
        self.ground_truth = ground_truth
        self.data_source = data_source
        self.name = name
        self.__name__ = name

    def _column(self, kwargs: dict[str, Any], path: str, n: int) -> list:
        """The values of column ``path`` (``col`` or ``col.key`` for a dict column); a KeyError listing the columns."""
        head, _, key = path.partition(".")
        if head not in kwargs or head in NOT_COLUMNS:
            columns = sorted(k for k in kwargs if k not in NOT_COLUMNS)
            raise KeyError(
                f"verl reward {self.name!r}: no column {head!r} for ground_truth; the records have {columns}"
            )
        values = list(kwargs[head])
        if key:
            values = [v.get(key) if isinstance(v, Mapping) else None for v in values]
        if len(values) != n:
            raise ValueError(f"verl reward {self.name!r}: column {head!r} has {len(values)} values for {n} samples")
        return values

    def __call__(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        n = len(completions)
        truths = self._column(kwargs, self.ground_truth, n)
        sources = kwargs.get("data_source") or [None] * n
        extras = kwargs.get("extra_info") or [None] * n
        scores: list[float | None] = []
        logged: dict[str, list] = {}
        for i, completion in enumerate(completions):
            result = self.compute_score(
                data_source=sources[i] if sources[i] is not None else self.data_source,
                solution_str=completion_text(completion),
                ground_truth=truths[i],
                extra_info=extras[i],
            )
            if isinstance(result, Mapping):
                if "score" not in result:
                    raise KeyError(f"verl reward {self.name!r} returned a dict without 'score': {sorted(result)}")
                for key, value in result.items():
                    if key != "score":
                        logged.setdefault(key, [None] * n)[i] = value
                result = result["score"]
            scores.append(None if result is None else float(result))
        log_extra = kwargs.get("log_extra")
        if log_extra is not None:
            for key, values in logged.items():
                log_extra(f"{self.name}/{key}", values)
        return scores

    def __repr__(self) -> str:
        return f"VerlReward({getattr(self.compute_score, '__qualname__', self.compute_score)!r})"
