"""Figures of the emergence curve (matplotlib, headless): used by the tracker, the report and notebooks."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
