"""Paper-ready figures: accuracy over rounds, per-client accuracy ECDFs, gain vs. entropy, kNN-Per's lambda.

Every function draws one figure for one question and writes it as a PNG (150 dpi) through
:func:`fedmem.results.atomic_write_bytes`, so a reader never sees half an image. The figures use
matplotlib's object-oriented API with the Agg canvas and never touch :mod:`matplotlib.pyplot` or
``rcParams``: nothing depends on a GUI backend or on global state, and separate threads may draw
separate figures at once.

Conventions shared by all figures:

* accuracies arrive as fractions in [0, 1] and are drawn in percent; gains arrive as accuracy
  fractions and are drawn in percentage points;
* colours follow the Okabe-Ito palette (distinguishable under the common colour-vision
  deficiencies); past eight series the colours repeat with another line style;
* NaN values (a client that was never evaluated, a round a seed skipped) are dropped, never drawn
  as zeros; a series left with nothing to draw is a ``ValueError``, so a line never silently
  disappears from a figure;
* more than six legend entries go below the axes in columns, on a wider figure, instead of over
  the data.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike, NDArray

from fedmem.results import atomic_write_bytes

# Okabe & Ito (2008), "Color Universal Design". Yellow goes last because thin yellow lines are
# hard to see on white; black is late because it reads as an axis or reference line.
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)
# Markers and line styles carry the identity too, for greyscale prints and for > 8 series.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")

DPI = 150
_SIZE = (6.4, 4.2)  # inches: a text-width figure; at this size the point sizes below are as printed
_WIDE = 7.4  # inches, when the legend goes below the axes
_MAX_INSIDE_LEGEND = 6  # more entries than this cover data; they go below the axes
_LEGEND_COLUMNS = 3

_TITLE_PT = 11
_LABEL_PT = 10
_TICK_PT = 9
_LEGEND_PT = 9

_REFERENCE_GREY = "0.45"  # reference lines (zero gain, bottom decile): visible, but not data


def _style(i: int) -> tuple[str, str, str]:
    """Colour, marker and line style of the i-th series."""
    return (
        PALETTE[i % len(PALETTE)],
        _MARKERS[i % len(_MARKERS)],
        _LINESTYLES[(i // len(PALETTE)) % len(_LINESTYLES)],
    )


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _require_nonempty(mapping: Mapping[str, object], what: str) -> None:
    if len(mapping) == 0:
        raise ValueError(f"{what} is empty: give at least one series to plot.")


def _finite(values: Sequence[float], what: str) -> NDArray[np.float64]:
    """The values as floats with NaN dropped; an error when nothing is left."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty: give at least one value.")
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise ValueError(f"{what} has only NaN values: nothing to plot.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains an infinite value.")
    return arr


def _check_range(arr: NDArray[np.float64], lo: float, hi: float, what: str, hint: str) -> None:
    # A small tolerance so that sums of float fractions (e.g. 0.1 * 10) do not trip the check.
    bad = arr[(arr < lo - 1e-9) | (arr > hi + 1e-9)]
    if bad.size:
        raise ValueError(f"{what} has value {bad[0]:g} outside [{lo:g}, {hi:g}]; {hint}.")


def _new_figure(n_legend_entries: int, *, below: bool = False) -> tuple[Figure, Axes, bool]:
    """A figure with one axes; wider and taller when its legend will go below the axes.

    The legend goes below when asked (``below``) or when it has too many entries to sit inside.
    """
    below = below or n_legend_entries > _MAX_INSIDE_LEGEND
    if below:
        rows = math.ceil(n_legend_entries / _LEGEND_COLUMNS)
        size = (_WIDE, _SIZE[1] + 0.25 * rows + 0.2)
    else:
        size = _SIZE
    # Constrained layout keeps labels, titles and an outside legend inside the canvas.
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = _new_axes(fig)
    return fig, ax, below


def _new_axes(fig: Figure, *position: int) -> Axes:
    """An axes of ``fig`` (``add_subplot`` position) with the shared tick size and light grid."""
    ax = fig.add_subplot(*position)
    ax.tick_params(labelsize=_TICK_PT)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    return ax


def _error_line(ax: Axes, i: int, x: ArrayLike, mean: ArrayLike, std: ArrayLike, label: str) -> None:
    """Series ``i`` as a line of means with ±std error bars, in its palette style."""
    colour, marker, style = _style(i)
    ax.errorbar(
        x,
        mean,
        yerr=std,
        color=colour,
        marker=marker,
        linestyle=style,
        capsize=3,
        linewidth=1.5,
        label=label,
    )


def _labels(ax: Axes, *, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=_TITLE_PT)
    ax.set_xlabel(xlabel, fontsize=_LABEL_PT)
    ax.set_ylabel(ylabel, fontsize=_LABEL_PT)


def _fit_columns(fig: Figure, labels: Sequence[str]) -> int:
    """As many legend columns as the longest entry lets fit across the figure.

    A 9 pt character is about 0.6 x 9 pt wide; the handle and the gap take about 6 more.
    """
    chars = fig.get_figwidth() * 72 / (0.6 * _LEGEND_PT)
    longest = max((len(label) for label in labels), default=1)
    return max(1, min(_LEGEND_COLUMNS, len(labels), int(chars // (longest + 6))))


def _legend(
    fig: Figure,
    ax: Axes,
    below: bool,
    *,
    title: str | None = None,
    loc: Literal["best", "upper center"] = "best",
    ncols: int = 1,
) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if below:
        columns = _fit_columns(fig, labels)
        rows = math.ceil(len(labels) / columns)
        fig.set_size_inches(fig.get_figwidth(), _SIZE[1] + 0.25 * rows + 0.2)
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=columns,
            fontsize=_LEGEND_PT,
            title=title,
            title_fontsize=_LEGEND_PT,
            frameon=False,
        )
    else:
        ax.legend(
            handles,
            labels,
            loc=loc,
            ncols=ncols,
            fontsize=_LEGEND_PT,
            title=title,
            title_fontsize=_LEGEND_PT,
            framealpha=0.9,
        )


def _save(fig: Figure, path: Path) -> Path:
    # Render in memory first: the file then appears whole (atomic rename) or not at all.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


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
    _require_nonempty(series, "series")
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
        _check_range(mean_arr, 0.0, 1.0, f"series[{label!r}]", "pass accuracies as fractions, not percent")
        lines.append((str(label), len(runs), rounds, mean_arr, np.asarray(std, dtype=np.float64)))

    seed_counts = {n for _, n, _, _, _ in lines}
    mixed = len(seed_counts) > 1
    if max(seed_counts) < 2:
        note = None
    elif mixed:
        note = "band: ±1 std over each line's seeds"
    else:
        note = f"band: ±1 std over {max(seed_counts)} seeds"

    fig, ax, below = _new_figure(len(lines))
    for i, (label, n_seeds, rounds, mean_arr, std_arr) in enumerate(lines):
        colour, marker, linestyle = _style(i)
        # With different seed counts per line the reader needs each line's count to read its band.
        shown = f"{label} ({_plural(n_seeds, 'seed')})" if mixed else label
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
    _labels(ax, title=title, xlabel=xlabel, ylabel=ylabel)
    _legend(fig, ax, below, title=note)
    return _save(fig, path)


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
    _require_nonempty(accuracies, "accuracies")
    data = []
    for name, values in accuracies.items():
        arr = _finite(values, f"accuracies[{name!r}]")
        _check_range(arr, 0.0, 1.0, f"accuracies[{name!r}]", "pass accuracies as fractions, not percent")
        data.append((str(name), np.sort(100 * arr)))

    fig, ax, below = _new_figure(len(data) + 1)  # + the bottom decile's entry
    for i, (name, x) in enumerate(data):
        colour, _, linestyle = _style(i)
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
    ax.axhline(0.1, color=_REFERENCE_GREY, linestyle=":", linewidth=1.2, label="bottom decile")
    ax.set_ylim(-0.02, 1.02)
    _labels(ax, title=title, xlabel="client test accuracy (%)", ylabel="fraction of clients")
    _legend(fig, ax, below)
    return _save(fig, path)


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
    _require_nonempty(points, "points")
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
        _check_range(gain, -1.0, 1.0, f"points[{name!r}] gains", "pass accuracy fractions, not points")
        data.append((str(name), ent, 100 * gain))

    unit_one = entropy_unit[:-1] if entropy_unit.endswith("s") else entropy_unit
    fig, ax, below = _new_figure(len(data) + 1)  # + the zero line's entry
    ax.axhline(0.0, color=_REFERENCE_GREY, linewidth=1.0, label="no gain", zorder=1)
    for i, (name, ent, gain) in enumerate(data):
        colour, marker, _ = _style(i)
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
    _labels(
        ax,
        title=title,
        xlabel=f"label entropy of the client's training data ({entropy_unit})",
        ylabel="personalization gain (accuracy points,\npersonalized − global)",
    )
    _legend(fig, ax, below)
    return _save(fig, path)


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
    _require_nonempty(lambdas, "lambdas")
    data = []
    for name, values in lambdas.items():
        arr = _finite(values, f"lambdas[{name!r}]")
        _check_range(arr, 0.0, 1.0, f"lambdas[{name!r}]", "lambda is a weight in [0, 1]")
        data.append((str(name), arr))
    lam_label = "λ chosen on validation (weight of the kNN memory)"

    if grid is not None:
        grid_arr = np.unique(_finite(grid, "grid"))  # sorted, duplicates merged
        fig, ax, below = _new_figure(len(data))
        positions = np.arange(grid_arr.size, dtype=np.float64)
        # Bars of one lambda value sit side by side, 80 % of the slot between two grid values.
        width = 0.8 / len(data)
        for i, (name, arr) in enumerate(data):
            colour, _, _ = _style(i)
            counts = np.bincount(_snap_to_grid(arr, grid_arr, f"lambdas[{name!r}]"), minlength=grid_arr.size)
            offset = (i - (len(data) - 1) / 2) * width
            ax.bar(
                positions + offset,
                counts,
                width=width,
                color=colour,
                edgecolor="white",
                linewidth=0.5,
                label=f"{name} ({_plural(arr.size, 'client')})",
            )
        ax.set_xticks(positions, [f"{g:g}" for g in grid_arr])
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(False, axis="x")
        _labels(ax, title=title, xlabel=lam_label, ylabel="clients")
        if not below:
            # Bars fill the axes from edge to edge, so no corner is free for the legend: make room
            # above the tallest bar for a legend laid out in a row or two across the top.
            ncols = _fit_columns(fig, ax.get_legend_handles_labels()[1])
            rows = math.ceil(len(data) / ncols)
            tallest = max(ax.get_ylim()[1], 1.0)
            ax.set_ylim(0, tallest * (1.12 + 0.1 * rows))
            _legend(fig, ax, below, loc="upper center", ncols=ncols)
        else:
            _legend(fig, ax, below)
    else:
        # Points span the whole height of every column: no place inside is free for a legend.
        fig, ax, below = _new_figure(len(data) + 1, below=True)  # + the median's entry
        rng = np.random.default_rng(0)
        for i, (name, arr) in enumerate(data):
            colour, marker, _ = _style(i)
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
                label=f"{name} ({_plural(arr.size, 'client')})",
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
        _labels(ax, title=title, xlabel="setting", ylabel=lam_label)
        # One legend entry for all medians, after the settings.
        ax.plot([], [], color="black", linewidth=2.0, label="median")
        _legend(fig, ax, below)
    return _save(fig, path)


# --------------------------------------------------------------------------- leakage audit


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
    _require_nonempty(curves, "curves")
    data = []
    for name, (fpr_seq, tpr_seq, area) in curves.items():
        fpr, tpr = _pair(str(name), (fpr_seq, tpr_seq), "curves")
        keep = (fpr > 0) & (tpr > 0)
        if not keep.any():
            raise ValueError(f"curves[{name!r}] has no point with positive FPR and TPR.")
        data.append((str(name), fpr[keep], tpr[keep], float(area)))
    low = max(1e-4, min(float(f.min()) for _, f, _, _ in data))
    fig, ax, below = _new_figure(len(data) + 1)
    ax.plot([low, 1], [low, 1], color=_REFERENCE_GREY, linestyle="--", linewidth=1.0, label="chance")
    for i, (name, fpr, tpr, area) in enumerate(data):
        colour, _, style = _style(i)
        ax.plot(fpr, tpr, color=colour, linestyle=style, linewidth=1.6, label=f"{name} (AUC {area:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, 1)
    ax.set_ylim(low, 1)
    _labels(ax, title=title, xlabel="false positive rate", ylabel="true positive rate")
    _legend(fig, ax, below, loc="best")
    return _save(fig, path)


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
    _require_nonempty(series, "series")
    data = []
    for n, s in series.items():
        reps, mean, std = _pair(str(n), s, "series")
        data.append((str(n), reps, mean, std))
    extra = 1 + (max_exposure is not None)
    fig, ax, _ = _new_figure(len(data) + extra)
    ax.axhline(
        null, color=_REFERENCE_GREY, linestyle=":", linewidth=1.2, label=f"never inserted ({null:.2f} bits)"
    )
    if max_exposure is not None:
        ax.axhline(
            max_exposure,
            color=_REFERENCE_GREY,
            linestyle="--",
            linewidth=1.0,
            label=f"maximum measurable (log2 N = {max_exposure:.2f} bits)",
        )
    counts: set[float] = set()
    for i, (name, reps, mean, std) in enumerate(data):
        counts.update(reps.tolist())
        _error_line(ax, i, reps, mean, std, name)
    ticks = sorted(counts)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    _labels(
        ax,
        title=title,
        xlabel="repetitions of the canary in its client's train split",
        ylabel="exposure (bits), mean ± std over clients",
    )
    # Exposures fill the whole height up to the maximum line: a legend inside would hide points.
    _legend(fig, ax, True)
    return _save(fig, path)


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
    _require_nonempty(points, "points")
    data = []
    for name, pair in points.items():
        gain, area = _pair(str(name), pair, "points")
        _check_range(gain, -1.0, 1.0, f"points[{name!r}] gains", "pass accuracy fractions, not points")
        data.append((str(name), 100 * gain, area))
    fig, ax, below = _new_figure(len(data) + 1)
    ax.axhline(0.5, color=_REFERENCE_GREY, linestyle="--", linewidth=1.0, label="chance (AUC 0.5)")
    ax.axvline(0.0, color=_REFERENCE_GREY, linewidth=0.8)
    for i, (name, gain, area) in enumerate(data):
        colour, marker, _ = _style(i)
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
    _labels(
        ax,
        title=title,
        xlabel="accuracy gain over the global model (percentage points)",
        ylabel="membership-inference AUC (per client)",
    )
    _legend(fig, ax, below)
    return _save(fig, path)


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
    fig, ax, _ = _new_figure(1)
    ax.axhline(0.0, color=_REFERENCE_GREY, linewidth=1.0)
    ax.errorbar(
        x, y, yerr=err, color=PALETTE[0], marker="o", linestyle="none", capsize=3, label="client ± 1 s.e."
    )
    step = max(1, math.ceil(len(ids) / 30))
    labels = [
        f"c{ids[i]}" + (f"\n({sizes[i]})" if sizes is not None else "") if k % step == 0 else ""
        for k, i in enumerate(order)
    ]
    ax.set_xticks(x, labels, fontsize=_TICK_PT - 1)
    _labels(
        ax,
        title=title,
        xlabel="client, by decreasing memorization" + (" (train size)" if sizes is not None else ""),
        ylabel="memorization (accuracy in − out,\npercentage points)",
    )
    _legend(fig, ax, False)
    return _save(fig, path)


def setting_points(
    values: Sequence[Sequence[float]],
) -> tuple[list[int], NDArray[np.float64], NDArray[np.float64]]:
    """Positions, means and population stds of the settings that have a finite value.

    ``values`` holds, per setting, the values over seeds; NaN values are dropped and a setting left
    with none is skipped, never drawn as 0.
    """
    xs: list[int] = []
    mean: list[float] = []
    std: list[float] = []
    for i, v in enumerate(values):
        a = np.asarray(v, np.float64).reshape(-1)
        a = a[~np.isnan(a)]
        if a.size:
            xs.append(i)
            mean.append(float(a.mean()))
            std.append(float(a.std()))
    return xs, np.asarray(mean, np.float64), np.asarray(std, np.float64)


def metric_panels(
    settings: Sequence[str],
    panels: Sequence[tuple[str, Mapping[str, Sequence[Sequence[float]]], float | None]],
    path: Path,
    *,
    title: str,
    xlabel: str,
) -> Path:
    """Several metrics against one ordered setting (e.g. a noise multiplier), one panel per metric.

    Each panel draws one line per series, the mean over seeds at every setting with ±1 std error
    bars; the x axis is categorical (``settings`` are tick labels, in order), so a setting of 0 and
    one of "no clipping" sit beside the numeric ones, and a label can carry two lines (the
    multiplier and the epsilon it spends).

    Parameters
    ----------
    settings
        Tick labels of the x positions, in order.
    panels
        ``(y label, series, reference)`` per panel. ``series`` maps a line label to one sequence of
        values over seeds per setting (``len(settings)`` of them; an empty sequence or NaN values
        leave that point out). ``reference``, when not None, is drawn as a dashed grey line (chance
        AUC, the exposure of a never-inserted canary). Values are drawn as given.
    path
        Where to write the PNG.
    title
        The figure's title.
    xlabel
        The label of the shared x axis, once under the panels.

    Raises
    ------
    ValueError
        If there is no setting or panel, a series has another number of settings, or a series
        has nothing to draw.
    """
    if len(settings) == 0:
        raise ValueError("settings is empty: give at least one setting.")
    if len(panels) == 0:
        raise ValueError("panels is empty: give at least one metric.")
    names: list[str] = []
    for ylabel, series, _ in panels:
        _require_nonempty(series, f"the series of panel {ylabel!r}")
        for name, values in series.items():
            if len(values) != len(settings):
                raise ValueError(
                    f"series {name!r} of panel {ylabel!r} has {len(values)} settings, "
                    f"expected {len(settings)}."
                )
            if name not in names:
                names.append(str(name))
    fig = Figure(figsize=(3.3 * len(panels) + 0.6, _SIZE[1] + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(settings))
    for j, (ylabel, series, reference) in enumerate(panels):
        ax = _new_axes(fig, 1, len(panels), j + 1)
        if reference is not None:
            ax.axhline(reference, color=_REFERENCE_GREY, linestyle="--", linewidth=1.0)
        for name, values in series.items():
            xs, mean, std = setting_points(values)
            if not xs:
                raise ValueError(f"series {name!r} of panel {ylabel!r} has nothing to draw.")
            _error_line(ax, names.index(str(name)), x[xs], mean, std, str(name))
        ax.set_xticks(x, list(settings), fontsize=_TICK_PT - 1)
        ax.set_ylabel(ylabel, fontsize=_LABEL_PT)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    for ax in fig.axes[1:]:  # a series absent from the first panel still gets its legend entry
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.suptitle(title, fontsize=_TITLE_PT)
    fig.supxlabel(xlabel, fontsize=_LABEL_PT)  # once: the panels share their settings
    fig.legend(
        handles,
        labels,
        loc="outside right upper",
        ncols=1,
        fontsize=_LEGEND_PT,
        frameon=False,
    )
    return _save(fig, path)
