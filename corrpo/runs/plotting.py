"""Figures of the emergence curve (matplotlib, headless): used by the tracker, the report and notebooks."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from corrpo.inversion.anatomy_probe import anatomy_factors


def emergence_figure(rows: Sequence[dict], boundary_batches: int | None = None, label: str | None = None):
    """Spearman rho (and Pearson r) against training batches, with the SFT->RL boundary marked.

    ``rows`` are emergence.csv rows (dicts with ``batches``, ``spearman``, ``pearson``). Below zero is the
    inversion; the dotted line at 0 is the base-model level.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [int(r["batches"]) for r in rows]
    ax.plot(xs, [float(r["spearman"]) for r in rows], marker="o", label=label or "Spearman rho")
    ax.plot(xs, [float(r["pearson"]) for r in rows], linestyle="--", alpha=0.6, label="Pearson r")
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    if boundary_batches:
        ax.axvline(boundary_batches, color="red", linestyle="--", linewidth=1, label="SFT -> RL")
    ax.set_xlabel("training step (batches)")
    ax.set_ylabel("entropy-gradient correlation")
    ax.set_title("Emergence of the entropy-gradient inversion")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def anatomy_figure(rows: Sequence[dict], boundary_batches: int | None = None, title: str | None = None):
    """Spearman(H, factor) of every anatomy factor against training batches, next to rho = Spearman(H, S).

    ``rows`` are emergence.csv rows with ``anatomy_<factor>`` columns (the tracker's ``anatomy: true``). A factor
    whose curve follows rho's sign and size is the one carrying the sign (:mod:`corrpo.inversion.anatomy`);
    a factor that is constant on the probe set (NaN rho, e.g. a logit slope of 1) is left out.
    """

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [int(r["batches"]) for r in rows]
    ax.plot(xs, [float(r["spearman"]) for r in rows], color="black", linewidth=2.5, marker="o", label="strength S")
    per_row = [anatomy_factors(r) for r in rows]
    names = list(per_row[0]) if per_row else []
    for i, name in enumerate(names):
        ys = [float(f.get(name, float("nan"))) for f in per_row]
        if all(y != y for y in ys):  # all NaN: a constant factor
            continue
        final_norm = name in ("inv_rms", "w_norm", "sin", "dz_dh")
        ax.plot(xs, ys, marker=".", linewidth=1.6 if final_norm else 0.9, linestyle="-" if final_norm else "--",
                color=plt.cm.tab20(i % 20), label=name)  # fmt: skip
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
    if boundary_batches:
        ax.axvline(boundary_batches, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("training step (batches); red: SFT -> RL")
    ax.set_ylabel("Spearman(H, factor)")
    ax.set_title(title or "Which factor carries the sign (solid: final norm)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    return fig
