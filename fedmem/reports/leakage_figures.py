"""The figures of a leakage audit: ROC curves, canary exposure, leakage vs. gain, counterfactual ranking.

Drawn by :mod:`fedmem.reports.audit`; the shared style is :mod:`fedmem.reports.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedmem.reports.figures import (
    PALETTE,
    REFERENCE_GREY,
    TICK_PT,
    axis_labels,
    check_range,
    error_line,
    legend,
    new_figure,
    require_nonempty,
    save_png,
    series_style,
)


def _pair(
    name: str, pair: Sequence[Sequence[float] | NDArray[np.float64]], what: str
) -> tuple[NDArray[np.float64], ...]:
    """Equal-length float arrays of one series, with entries NaN in any of them dropped."""
    arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in pair]
    if len({a.size for a in arrays}) != 1:
        sizes = " and ".join(str(a.size) for a in arrays)
        raise ValueError(
            f"{what}[{name!r}] has sequences of different lengths ({sizes}); give one value each."
        )
    keep = np.all([~np.isnan(a) for a in arrays], axis=0)
    if not keep.any():
        raise ValueError(f"{what}[{name!r}] has nothing finite to plot.")
    return tuple(a[keep] for a in arrays)


def roc_curves(
    curves: Mapping[
        str, tuple[Sequence[float] | NDArray[np.float64], Sequence[float] | NDArray[np.float64], float]
    ],
    path: Path,
    *,
    title: str = "Membership inference ROC",
) -> Path:
    """ROC curves of a membership-inference attack, one per predictor, on log-log axes.

    Carlini et al. ("Membership Inference Attacks From First Principles", S&P 2022) argue that an
    attack matters by its true-positive rate at very low false-positive rates, which linear axes
    hide; log-log axes show it, and the chance line ``TPR = FPR`` is the diagonal.

    Parameters
    ----------
    curves
        Predictor -> ``(fpr, tpr, auc)``. Points with ``fpr == 0`` or ``tpr == 0`` cannot be drawn
        on log axes and are dropped (the curve starts at its first positive point).
    path
        Where to write the PNG.
    """
    require_nonempty(curves, "curves")
    data = []
    for name, (fpr_seq, tpr_seq, area) in curves.items():
        fpr, tpr = _pair(str(name), (fpr_seq, tpr_seq), "curves")
        keep = (fpr > 0) & (tpr > 0)
        if not keep.any():
            raise ValueError(f"curves[{name!r}] has no point with positive FPR and TPR.")
        data.append((str(name), fpr[keep], tpr[keep], float(area)))
    low = max(1e-4, min(float(f.min()) for _, f, _, _ in data))
    fig, ax, below = new_figure(len(data) + 1)
    ax.plot([low, 1], [low, 1], color=REFERENCE_GREY, linestyle="--", linewidth=1.0, label="chance")
    for i, (name, fpr, tpr, area) in enumerate(data):
        colour, _, style = series_style(i)
        ax.plot(fpr, tpr, color=colour, linestyle=style, linewidth=1.6, label=f"{name} (AUC {area:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, 1)
    ax.set_ylim(low, 1)
    axis_labels(ax, title=title, xlabel="false positive rate", ylabel="true positive rate")
    legend(fig, ax, below, loc="best")
    return save_png(fig, path)


def exposure_vs_repetitions(
    series: Mapping[str, tuple[Sequence[int], Sequence[float], Sequence[float]]],
    path: Path,
    *,
    null: float,
    max_exposure: float | None = None,
    title: str = "Canary exposure vs repetitions",
) -> Path:
    """Mean canary exposure (bits) against how often the canary was repeated, one line per predictor.

    Parameters
    ----------
    series
        Predictor -> ``(repetition counts, mean exposure, std)``; the std is drawn as error bars.
    null
        Expected exposure of a never-inserted canary (about ``1 / ln 2`` bits), drawn dotted.
    max_exposure
        The largest exposure the rank estimator can show (``log2`` of the number of references).
    """
    require_nonempty(series, "series")
    data = []
    for n, s in series.items():
        reps, mean, std = _pair(str(n), s, "series")
        data.append((str(n), reps, mean, std))
    extra = 1 + (max_exposure is not None)
    fig, ax, _ = new_figure(len(data) + extra)
    ax.axhline(
        null, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label=f"never inserted ({null:.2f} bits)"
    )
    if max_exposure is not None:
        ax.axhline(
            max_exposure,
            color=REFERENCE_GREY,
            linestyle="--",
            linewidth=1.0,
            label=f"maximum measurable (log2 N = {max_exposure:.2f} bits)",
        )
    counts: set[float] = set()
    for i, (name, reps, mean, std) in enumerate(data):
        counts.update(reps.tolist())
        error_line(ax, i, reps, mean, std, name)
    ticks = sorted(counts)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    axis_labels(
        ax,
        title=title,
        xlabel="repetitions of the canary in its client's train split",
        ylabel="exposure (bits), mean ± std over clients",
    )
    # Exposures fill the whole height up to the maximum line: a legend inside would hide points.
    legend(fig, ax, True)
    return save_png(fig, path)


def privacy_vs_gain(
    points: Mapping[str, tuple[Sequence[float] | NDArray[np.float64], Sequence[float] | NDArray[np.float64]]],
    path: Path,
    *,
    title: str = "Per-client leakage vs personalization gain",
) -> Path:
    """Per-client membership-inference AUC against the client's accuracy gain over the global model.

    Parameters
    ----------
    points
        Predictor -> ``(gains, aucs)``, one entry per client; gains are accuracy fractions.
    """
    require_nonempty(points, "points")
    data = []
    for name, pair in points.items():
        gain, area = _pair(str(name), pair, "points")
        check_range(gain, -1.0, 1.0, f"points[{name!r}] gains", "pass accuracy fractions, not points")
        data.append((str(name), 100 * gain, area))
    fig, ax, below = new_figure(len(data) + 1)
    ax.axhline(0.5, color=REFERENCE_GREY, linestyle="--", linewidth=1.0, label="chance (AUC 0.5)")
    ax.axvline(0.0, color=REFERENCE_GREY, linewidth=0.8)
    for i, (name, gain, area) in enumerate(data):
        colour, marker, _ = series_style(i)
        ax.scatter(
            gain,
            area,
            color=colour,
            marker=marker,
            s=34,
            alpha=0.85,
            edgecolors="white",
            linewidths=0.5,
            label=name,
        )
    axis_labels(
        ax,
        title=title,
        xlabel="accuracy gain over the global model (percentage points)",
        ylabel="membership-inference AUC (per client)",
    )
    legend(fig, ax, below)
    return save_png(fig, path)


def _ranked(memorization: NDArray[np.float64]) -> NDArray[np.intp]:
    """Indices by descending memorization (stable: ties keep the given order)."""
    return np.argsort(-memorization, kind="stable")


def counterfactual_ranking(
    clients: Sequence[int],
    memorization: Sequence[float] | NDArray[np.float64],
    stderr: Sequence[float] | NDArray[np.float64],
    path: Path,
    *,
    sizes: Sequence[int] | None = None,
    title: str = "Client-level counterfactual memorization",
) -> Path:
    """Clients ranked by counterfactual memorization, with ±1 standard-error bars.

    Parameters
    ----------
    clients, memorization, stderr
        Per client: its id, ``mean_in - mean_out`` of its accuracy as a fraction, and the
        standard error (an infinite one draws the point without a bar).
    sizes
        Optional train-split sizes, printed under the client ids.
    """
    mem = np.asarray(memorization, dtype=np.float64)
    se = np.asarray(stderr, dtype=np.float64)
    ids = list(clients)
    if not (len(ids) == mem.size == se.size) or (sizes is not None and len(sizes) != len(ids)):
        raise ValueError("clients, memorization, stderr (and sizes) must have one entry per client.")
    if not ids:
        raise ValueError("clients is empty: give at least one client.")
    order = _ranked(mem)
    x = np.arange(len(ids))
    y = 100 * mem[order]
    err = 100 * np.where(np.isfinite(se[order]), se[order], 0.0)
    fig, ax, _ = new_figure(1)
    ax.axhline(0.0, color=REFERENCE_GREY, linewidth=1.0)
    ax.errorbar(
        x, y, yerr=err, color=PALETTE[0], marker="o", linestyle="none", capsize=3, label="client ± 1 s.e."
    )
    step = max(1, math.ceil(len(ids) / 30))
    labels = [
        f"c{ids[i]}" + (f"\n({sizes[i]})" if sizes is not None else "") if k % step == 0 else ""
        for k, i in enumerate(order)
    ]
    ax.set_xticks(x, labels, fontsize=TICK_PT - 1)
    axis_labels(
        ax,
        title=title,
        xlabel="client, by decreasing memorization" + (" (train size)" if sizes is not None else ""),
        ylabel="memorization (accuracy in − out,\npercentage points)",
    )
    legend(fig, ax, False)
    return save_png(fig, path)
