"""The figures of run and sweep reports: accuracy over rounds, per-client accuracy, gain vs. entropy, lambda.

Drawn by :func:`fedmem.reports.runs.render_plots`; the shared style is :mod:`fedmem.reports.figures`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator
from numpy.typing import NDArray

from fedmem.reports.figures import (
    REFERENCE_GREY,
    axis_labels,
    check_range,
    finite_values,
    fit_columns,
    legend,
    new_figure,
    plural,
    require_nonempty,
    save_png,
    series_style,
)


def mean_std_over_seeds(
    runs: Sequence[Sequence[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float]]:
    """Rounds present in every run, the mean and the population std of accuracy at each.

    Parameters
    ----------
    runs
        One sequence of ``(round, accuracy)`` points per seed. A point whose accuracy is NaN is
        dropped, so that round counts as absent from that seed.

    Returns
    -------
    rounds, mean, std
        The rounds every run reports (ascending), and at each the mean and the population standard
        deviation (``ddof=0``) of the accuracies over runs, in the input's unit. One run gives a
        standard deviation of 0. Runs with no round in common give three empty lists.

    Raises
    ------
    ValueError
        If ``runs`` is empty, or a run reports the same round twice (ambiguous which to use).
    """
    if len(runs) == 0:
        raise ValueError("runs is empty: give the (round, accuracy) points of at least one seed.")
    by_run: list[dict[int, float]] = []
    for i, run in enumerate(runs):
        points: dict[int, float] = {}
        for rnd, acc in run:
            r, a = int(rnd), float(acc)
            if r in points:
                raise ValueError(f"run {i} reports round {r} twice.")
            if not math.isnan(a):
                points[r] = a
        by_run.append(points)
    common = sorted(set.intersection(*(set(p) for p in by_run)))
    if not common:
        return [], [], []
    values = np.array([[p[r] for r in common] for p in by_run], dtype=np.float64)  # runs x rounds
    return common, values.mean(axis=0).tolist(), values.std(axis=0, ddof=0).tolist()


def accuracy_vs_round(
    series: Mapping[str, Sequence[Sequence[tuple[int, float]]]],
    path: Path,
    *,
    title: str,
    ylabel: str = "test accuracy (%), mean over clients",
    xlabel: str = "round",
) -> Path:
    """Accuracy over federated rounds, one line per label, mean over seeds with a ±1 std band.

    Any integer x works the same way (``xlabel``): local adaptation steps draw an adaptation curve.

    Parameters
    ----------
    series
        Line label (e.g. ``"FedAvg · kNN-Per"``) -> one sequence of ``(round, accuracy)`` points per
        seed, accuracies as fractions in [0, 1]. Each line shows the rounds that every seed of that
        label reports (see :func:`mean_std_over_seeds`; NaN accuracies are dropped). With two or
        more seeds a shaded band shows ±1 population standard deviation over seeds.
    path
        Where to write the PNG.
    title
        The figure's title.
    ylabel
        The y axis label; the values are drawn in percent.
    xlabel
        The x axis label ("round", or e.g. "local adaptation steps").

    Returns
    -------
    Path
        ``path``, written.

    Raises
    ------
    ValueError
        If ``series`` is empty, a label has no seeds, its seeds share no round with a finite
        accuracy, or an accuracy lies outside [0, 1] (percent passed instead of a fraction).
    """
    require_nonempty(series, "series")
    lines: list[tuple[str, int, list[int], NDArray[np.float64], NDArray[np.float64]]] = []
    for label, runs in series.items():
        if len(runs) == 0:
            raise ValueError(f"series[{label!r}] has no seeds: give at least one run of points.")
        rounds, mean, std = mean_std_over_seeds(runs)
        if not rounds:
            raise ValueError(
                f"series[{label!r}] has no round that every seed reports with a finite accuracy."
            )
        mean_arr = np.asarray(mean, dtype=np.float64)
        check_range(mean_arr, 0.0, 1.0, f"series[{label!r}]", "pass accuracies as fractions, not percent")
        lines.append((str(label), len(runs), rounds, mean_arr, np.asarray(std, dtype=np.float64)))

    seed_counts = {n for _, n, _, _, _ in lines}
    mixed = len(seed_counts) > 1
    if max(seed_counts) < 2:
        note = None
    elif mixed:
        note = "band: ±1 std over each line's seeds"
    else:
        note = f"band: ±1 std over {max(seed_counts)} seeds"

    fig, ax, below = new_figure(len(lines))
    for i, (label, n_seeds, rounds, mean_arr, std_arr) in enumerate(lines):
        colour, marker, linestyle = series_style(i)
        # With different seed counts per line the reader needs each line's count to read its band.
        shown = f"{label} ({plural(n_seeds, 'seed')})" if mixed else label
        # Hundreds of markers turn a line into a smear; about 25 are enough to read the points.
        every = max(1, len(rounds) // 25)
        ax.plot(
            rounds,
            100 * mean_arr,
            color=colour,
            marker=marker,
            linestyle=linestyle,
            markersize=4,
            linewidth=1.6,
            markevery=every,
            label=shown,
        )
        if n_seeds >= 2:
            # Accuracy cannot leave [0, 100] %, so neither may its band.
            lo = np.clip(100 * (mean_arr - std_arr), 0, 100)
            hi = np.clip(100 * (mean_arr + std_arr), 0, 100)
            ax.fill_between(rounds, lo, hi, color=colour, alpha=0.18, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis_labels(ax, title=title, xlabel=xlabel, ylabel=ylabel)
    legend(fig, ax, below, title=note)
    return save_png(fig, path)


def client_accuracy_ecdf(
    accuracies: Mapping[str, Sequence[float]],
    path: Path,
    *,
    title: str,
) -> Path:
    """Empirical CDF of per-client test accuracy, one step line per predictor, bottom decile marked.

    Parameters
    ----------
    accuracies
        Predictor name -> per-client accuracies as fractions in [0, 1] (pooled over seeds). NaN
        values (clients never evaluated) are dropped.
    path
        Where to write the PNG.
    title
        The figure's title.

    Returns
    -------
    Path
        ``path``, written.

    Notes
    -----
    Each predictor's 10th percentile (``np.percentile(a, 10)``, linear interpolation) is a dashed
    vertical line in its colour and is quoted in its legend entry; a dotted grey line at 0.1 marks
    the bottom decile of clients, so a line crossing it further right has a better-off worst tenth.

    Raises
    ------
    ValueError
        If ``accuracies`` or one of its sequences is empty (or only NaN), or a value lies outside
        [0, 1].
    """
    require_nonempty(accuracies, "accuracies")
    data = []
    for name, values in accuracies.items():
        arr = finite_values(values, f"accuracies[{name!r}]")
        check_range(arr, 0.0, 1.0, f"accuracies[{name!r}]", "pass accuracies as fractions, not percent")
        data.append((str(name), np.sort(100 * arr)))

    fig, ax, below = new_figure(len(data) + 1)  # + the bottom decile's entry
    for i, (name, x) in enumerate(data):
        colour, _, linestyle = series_style(i)
        p10 = float(np.percentile(x, 10))
        n = x.size
        # Start at 0 on the smallest value so the first step is drawn; y is "fraction <= x".
        xs = np.concatenate([x[:1], x])
        ys = np.concatenate([[0.0], np.arange(1, n + 1) / n])
        ax.step(
            xs,
            ys,
            where="post",
            color=colour,
            linestyle=linestyle,
            linewidth=1.8,
            label=f"{name} (p10 {p10:.1f} %)",
        )
        ax.axvline(p10, color=colour, linestyle="--", linewidth=1.0, alpha=0.9)
    ax.axhline(0.1, color=REFERENCE_GREY, linestyle=":", linewidth=1.2, label="bottom decile")
    ax.set_ylim(-0.02, 1.02)
    axis_labels(ax, title=title, xlabel="client test accuracy (%)", ylabel="fraction of clients")
    legend(fig, ax, below)
    return save_png(fig, path)


def gain_vs_entropy(
    points: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    title: str,
    entropy_unit: str = "bits",
) -> Path:
    """Personalization gain per client against the entropy of its label distribution.

    Parameters
    ----------
    points
        Personalized predictor name -> ``(entropies, gains)``, one entry per client: the entropy of
        the client's training label distribution and its gain as an accuracy fraction
        (personalized minus global, in [-1, 1]). A client whose entropy or gain is NaN is dropped.
    path
        Where to write the PNG.
    title
        The figure's title.
    entropy_unit
        Unit of the entropies, for the x axis label ("bits" for log2, "nats" for ln).

    Returns
    -------
    Path
        ``path``, written.

    Notes
    -----
    Gains are drawn in percentage points. A predictor with at least three clients and at least two
    distinct entropies gets a dashed least-squares trend line; its slope is quoted in the legend.

    Raises
    ------
    ValueError
        If ``points`` is empty, a predictor's two sequences differ in length, nothing finite is left
        for a predictor, or a gain lies outside [-1, 1].
    """
    require_nonempty(points, "points")
    data = []
    for name, pair in points.items():
        if len(pair) != 2:
            raise ValueError(f"points[{name!r}] must be a pair (entropies, gains).")
        ent = np.asarray(pair[0], dtype=np.float64).reshape(-1)
        gain = np.asarray(pair[1], dtype=np.float64).reshape(-1)
        if ent.size != gain.size:
            raise ValueError(
                f"points[{name!r}] has {ent.size} entropies but {gain.size} gains; "
                "give one of each per client."
            )
        if ent.size == 0:
            raise ValueError(f"points[{name!r}] is empty: give at least one client.")
        keep = ~(np.isnan(ent) | np.isnan(gain))
        if not keep.any():
            raise ValueError(f"points[{name!r}] has no client with a finite entropy and gain.")
        ent, gain = ent[keep], gain[keep]
        if not (np.all(np.isfinite(ent)) and np.all(np.isfinite(gain))):
            raise ValueError(f"points[{name!r}] contains an infinite value.")
        check_range(gain, -1.0, 1.0, f"points[{name!r}] gains", "pass accuracy fractions, not points")
        data.append((str(name), ent, 100 * gain))

    unit_one = entropy_unit[:-1] if entropy_unit.endswith("s") else entropy_unit
    fig, ax, below = new_figure(len(data) + 1)  # + the zero line's entry
    ax.axhline(0.0, color=REFERENCE_GREY, linewidth=1.0, label="no gain", zorder=1)
    for i, (name, ent, gain) in enumerate(data):
        colour, marker, _ = series_style(i)
        label = name
        if ent.size >= 3 and np.unique(ent).size >= 2:
            slope, intercept = np.polyfit(ent, gain, 1)
            xs = np.array([ent.min(), ent.max()])
            ax.plot(xs, slope * xs + intercept, color=colour, linestyle="--", linewidth=1.4, zorder=3)
            # A typographic minus, as on the axis ticks.
            trend = f"{slope:+.1f}".replace("-", "−")
            label = f"{name} (trend {trend} points/{unit_one})"
        # Translucent markers with white edges keep overlapping clients countable.
        ax.scatter(
            ent,
            gain,
            color=colour,
            marker=marker,
            s=30,
            alpha=0.8,
            edgecolors="white",
            linewidths=0.5,
            label=label,
            zorder=2,
        )
    axis_labels(
        ax,
        title=title,
        xlabel=f"label entropy of the client's training data ({entropy_unit})",
        ylabel="personalization gain (accuracy points,\npersonalized − global)",
    )
    legend(fig, ax, below)
    return save_png(fig, path)


def _snap_to_grid(values: NDArray[np.float64], grid: NDArray[np.float64], what: str) -> NDArray[np.intp]:
    """Index of each value's grid point; an error for a value not on the grid."""
    idx = np.abs(values[:, None] - grid[None, :]).argmin(axis=1)
    # Grid values usually come from arithmetic (0.1 * 3 = 0.30000000000000004): allow float noise.
    off = np.abs(values - grid[idx]) > 1e-6
    if off.any():
        raise ValueError(f"{what} has lambda {values[off][0]:g}, which is not on the grid.")
    return idx


def knn_lambda_across_clients(
    lambdas: Mapping[str, Sequence[float]],
    path: Path,
    *,
    title: str,
    grid: Sequence[float] | None = None,
) -> Path:
    """Distribution over clients of the interpolation weight lambda that kNN-Per chose, per setting.

    Parameters
    ----------
    lambdas
        Setting or strategy name -> kNN-Per's lambda per client (in [0, 1]; the weight of the kNN
        memory). NaN values (clients without a choice) are dropped.
    path
        Where to write the PNG.
    title
        The figure's title.
    grid
        The lambda values searched on validation. Given, the figure is a grouped bar chart of how
        many clients chose each value; omitted, a strip plot of every client's lambda (horizontal
        jitter from ``np.random.default_rng(0)``, so the figure is reproducible) with each
        setting's median.

    Returns
    -------
    Path
        ``path``, written.

    Raises
    ------
    ValueError
        If ``lambdas``, one of its sequences or ``grid`` is empty (or only NaN), a lambda lies
        outside [0, 1], or, with a grid, a lambda is not on the grid.
    """
    require_nonempty(lambdas, "lambdas")
    data = []
    for name, values in lambdas.items():
        arr = finite_values(values, f"lambdas[{name!r}]")
        check_range(arr, 0.0, 1.0, f"lambdas[{name!r}]", "lambda is a weight in [0, 1]")
        data.append((str(name), arr))
    lam_label = "λ chosen on validation (weight of the kNN memory)"

    if grid is not None:
        grid_arr = np.unique(finite_values(grid, "grid"))  # sorted, duplicates merged
        fig, ax, below = new_figure(len(data))
        positions = np.arange(grid_arr.size, dtype=np.float64)
        # Bars of one lambda value sit side by side, 80 % of the slot between two grid values.
        width = 0.8 / len(data)
        for i, (name, arr) in enumerate(data):
            colour, _, _ = series_style(i)
            counts = np.bincount(_snap_to_grid(arr, grid_arr, f"lambdas[{name!r}]"), minlength=grid_arr.size)
            offset = (i - (len(data) - 1) / 2) * width
            ax.bar(
                positions + offset,
                counts,
                width=width,
                color=colour,
                edgecolor="white",
                linewidth=0.5,
                label=f"{name} ({plural(arr.size, 'client')})",
            )
        ax.set_xticks(positions, [f"{g:g}" for g in grid_arr])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(False, axis="x")
        axis_labels(ax, title=title, xlabel=lam_label, ylabel="clients")
        if not below:
            # Bars fill the axes from edge to edge, so no corner is free for the legend: make room
            # above the tallest bar for a legend laid out in a row or two across the top.
            ncols = fit_columns(fig, ax.get_legend_handles_labels()[1])
            rows = math.ceil(len(data) / ncols)
            tallest = max(ax.get_ylim()[1], 1.0)
            ax.set_ylim(0, tallest * (1.12 + 0.1 * rows))
            legend(fig, ax, below, loc="upper center", ncols=ncols)
        else:
            legend(fig, ax, below)
    else:
        # Points span the whole height of every column: no place inside is free for a legend.
        fig, ax, below = new_figure(len(data) + 1, below=True)  # + the median's entry
        rng = np.random.default_rng(0)
        for i, (name, arr) in enumerate(data):
            colour, marker, _ = series_style(i)
            jitter = rng.uniform(-0.18, 0.18, size=arr.size)
            ax.scatter(
                i + jitter,
                arr,
                color=colour,
                marker=marker,
                s=22,
                alpha=0.7,
                edgecolors="white",
                linewidths=0.4,
                label=f"{name} ({plural(arr.size, 'client')})",
                zorder=2,
            )
            ax.hlines(
                float(np.median(arr)),
                i - 0.3,
                i + 0.3,
                color="black",
                linewidth=2.0,
                zorder=3,
            )
        names = [name for name, _ in data]
        # Long or many names collide horizontally; slanted they stay readable.
        slant = len(data) > 4 or max(len(n) for n in names) > 14
        ax.set_xticks(range(len(data)), names, rotation=20 if slant else 0, ha="right" if slant else "center")
        ax.set_xlim(-0.6, len(data) - 0.4)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(False, axis="x")
        axis_labels(ax, title=title, xlabel="setting", ylabel=lam_label)
        # One legend entry for all medians, after the settings.
        ax.plot([], [], color="black", linewidth=2.0, label="median")
        legend(fig, ax, below)
    return save_png(fig, path)
