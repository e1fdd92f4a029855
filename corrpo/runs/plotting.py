"""Figures of a run (matplotlib, headless): the emergence curve and its anatomy (the tracker, the report, the
notebook) and the training curves of :mod:`corrpo.runs.curves` (the report)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from corrpo.inversion.anatomy_probe import anatomy_factors
from corrpo.runs.curves import CurveSet

LEGEND_INSIDE = 3
"""Up to this many legend entries sit inside the axes; more go outside, right of them (save with
``bbox_inches="tight"``), so that no entry hides a line."""


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


def curves_figure(curves: CurveSet, boundary_step: int | None = None):
    """One :class:`corrpo.runs.curves.CurveSet` against the optimizer step: each series a line labelled as in the
    set (the ``main`` one bold, ``right`` ones on a second y-axis), the SFT->RL boundary dashed red.

    Each line's label and data are the set's, so ``{l.get_label(): l.get_xydata()}`` over ``fig.axes`` gives back
    what was plotted. A set with ``missing`` set has nothing to draw: a ValueError says why.
    """
    if curves.missing is not None or not curves.series:
        raise ValueError(f"{curves.name}: nothing to draw ({curves.missing or 'no series'})")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    right = ax.twinx() if any(s.right for s in curves.series) else None
    for i, series in enumerate(curves.series):
        xs, ys = [x for x, _ in series.points], [y for _, y in series.points]
        target = right if series.right and right is not None else ax
        few = len(xs) <= 40  # markers while they can be told apart
        target.plot(xs, ys, label=series.label, color="black" if series.main else f"C{i}",
                    linewidth=2.2 if series.main else 1.2, linestyle=":" if series.right else "-",
                    marker="o" if few else None, markersize=3.5 if series.main else 2.5,
                    zorder=3 if series.main else 2)  # fmt: skip
    if boundary_step:
        ax.axvline(boundary_step, color="red", linestyle="--", linewidth=1, label="SFT -> RL")
    ax.set_xlabel("optimizer step (trainer/global_step)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(curves.ylabel)
    if curves.ylim is not None:
        ax.set_ylim(*curves.ylim)
    if right is not None:
        right.set_ylabel(curves.right_label or "")
        if curves.right_ylim is not None:
            right.set_ylim(*curves.right_ylim)
    ax.set_title(curves.title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if len(labels) <= LEGEND_INSIDE:
        ax.legend(handles, labels, loc="best", fontsize=8)
    else:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.12 if right else 1.01, 1.0), fontsize=7)
    fig.tight_layout()
    return fig
