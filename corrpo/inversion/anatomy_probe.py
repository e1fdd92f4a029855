"""Spearman(H, factor) for every anatomy factor over a probe set: what the tracker's ``anatomy: true`` logs.

One :class:`~corrpo.inversion.metric.InversionStrength` per factor (the same fixed-buffer, DDP-exact Spearman as
the fingerprint itself), fed the probe tokens' entropies and that factor (:func:`corrpo.inversion.anatomy.
token_anatomy`). A factor whose rho has the fingerprint's sign, and a size near it, is the one carrying it.
"""

from __future__ import annotations

from torch import Tensor, nn

from corrpo.inversion.anatomy import token_anatomy
from corrpo.inversion.metric import InversionStrength

COLUMN_PREFIX = "anatomy_"
"""emergence.csv / fingerprint.json key of a factor's rho: ``anatomy_<factor>``."""


class AnatomyProbe:
    """Accumulates (entropy, factor) pairs over one probe measurement; ``compute`` -> ``{factor: rho}``."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.metrics: dict[str, InversionStrength] = {}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def update(self, model: nn.Module, enc: dict[str, Tensor], entropy: Tensor) -> dict[str, Tensor]:
        """Score one probe batch's factors, add them with ``entropy`` and return them (``[B, T]`` each)."""
        factors = token_anatomy(model, enc["input_ids"], enc["attention_mask"], enc["loss_mask"])
        for name, values in factors.items():
            if name not in self.metrics:
                self.metrics[name] = InversionStrength(max_tokens=self.max_tokens).to(entropy.device)
            self.metrics[name].update(entropy, values, enc["loss_mask"])
        return factors

    def compute(self) -> dict[str, float]:
        """``{factor: Spearman(H, factor)}`` over every token added since the last reset (all ranks)."""
        return {name: metric.compute()["spearman"].item() for name, metric in self.metrics.items()}


def anatomy_columns(rho: dict[str, float]) -> dict[str, float]:
    """``{"anatomy_<factor>": rho}``: the row keys emergence.csv and fingerprint.json carry."""
    return {f"{COLUMN_PREFIX}{name}": value for name, value in rho.items()}


def anatomy_factors(row: dict) -> dict[str, float]:
    """The inverse of :func:`anatomy_columns`: ``{factor: rho}`` from a row's ``anatomy_<factor>`` keys."""
    return {k[len(COLUMN_PREFIX) :]: float(v) for k, v in row.items() if k.startswith(COLUMN_PREFIX)}


def factor_table(rho: dict[str, float], fingerprint: float) -> str:
    """A plain-text table of Spearman(H, factor), the fingerprint first, for ``corrpo validate``."""
    lines = [f"{'factor':<14} {'Spearman(H, .)':>15}", f"{'strength':<14} {fingerprint:>15.4f}"]
    lines += [f"{name:<14} {value:>15.4f}" for name, value in rho.items()]
    return "\n".join(lines)
