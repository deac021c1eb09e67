"""What every figure of the reading wing shares: palette, sizes, axes, legends and the PNG writer.

The figures themselves live by audience: :mod:`fedmem.reports.run_figures` (runs and sweeps) and
:mod:`fedmem.reports.leakage_figures` (the leakage audit). Every figure function draws one figure
for one question and writes it as a PNG (150 dpi) through :func:`save_png`, so a reader never sees
half an image. The figures use matplotlib's object-oriented API with the Agg canvas and never touch
:mod:`matplotlib.pyplot` or ``rcParams``: nothing depends on a GUI backend or on global state, and
separate threads may draw separate figures at once.

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
SIZE = (6.4, 4.2)  # inches: a text-width figure; at this size the point sizes below are as printed
_WIDE = 7.4  # inches, when the legend goes below the axes
_MAX_INSIDE_LEGEND = 6  # more entries than this cover data; they go below the axes
_LEGEND_COLUMNS = 3

TITLE_PT = 11
LABEL_PT = 10
TICK_PT = 9
LEGEND_PT = 9

REFERENCE_GREY = "0.45"  # reference lines (zero gain, bottom decile): visible, but not data


def series_style(i: int) -> tuple[str, str, str]:
    """Colour, marker and line style of the i-th series."""
    return (
        PALETTE[i % len(PALETTE)],
        _MARKERS[i % len(_MARKERS)],
        _LINESTYLES[(i // len(PALETTE)) % len(_LINESTYLES)],
    )


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def require_nonempty(mapping: Mapping[str, object], what: str) -> None:
    if len(mapping) == 0:
        raise ValueError(f"{what} is empty: give at least one series to plot.")


def finite_values(values: Sequence[float], what: str) -> NDArray[np.float64]:
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


def check_range(arr: NDArray[np.float64], lo: float, hi: float, what: str, hint: str) -> None:
    # A small tolerance so that sums of float fractions (e.g. 0.1 * 10) do not trip the check.
    bad = arr[(arr < lo - 1e-9) | (arr > hi + 1e-9)]
    if bad.size:
        raise ValueError(f"{what} has value {bad[0]:g} outside [{lo:g}, {hi:g}]; {hint}.")


def new_figure(n_legend_entries: int, *, below: bool = False) -> tuple[Figure, Axes, bool]:
    """A figure with one axes; wider and taller when its legend will go below the axes.

    The legend goes below when asked (``below``) or when it has too many entries to sit inside.
    """
    below = below or n_legend_entries > _MAX_INSIDE_LEGEND
    if below:
        rows = math.ceil(n_legend_entries / _LEGEND_COLUMNS)
        size = (_WIDE, SIZE[1] + 0.25 * rows + 0.2)
    else:
        size = SIZE
    # Constrained layout keeps labels, titles and an outside legend inside the canvas.
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = new_axes(fig)
    return fig, ax, below


def new_axes(fig: Figure, *position: int) -> Axes:
    """An axes of ``fig`` (``add_subplot`` position) with the shared tick size and light grid."""
    ax = fig.add_subplot(*position)
    ax.tick_params(labelsize=TICK_PT)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    return ax


def error_line(ax: Axes, i: int, x: ArrayLike, mean: ArrayLike, std: ArrayLike, label: str) -> None:
    """Series ``i`` as a line of means with ±std error bars, in its palette style."""
    colour, marker, style = series_style(i)
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


def axis_labels(ax: Axes, *, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=TITLE_PT)
    ax.set_xlabel(xlabel, fontsize=LABEL_PT)
    ax.set_ylabel(ylabel, fontsize=LABEL_PT)


def fit_columns(fig: Figure, labels: Sequence[str]) -> int:
    """As many legend columns as the longest entry lets fit across the figure.

    A 9 pt character is about 0.6 x 9 pt wide; the handle and the gap take about 6 more.
    """
    chars = fig.get_figwidth() * 72 / (0.6 * LEGEND_PT)
    longest = max((len(label) for label in labels), default=1)
    return max(1, min(_LEGEND_COLUMNS, len(labels), int(chars // (longest + 6))))


def legend(
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
        columns = fit_columns(fig, labels)
        rows = math.ceil(len(labels) / columns)
        fig.set_size_inches(fig.get_figwidth(), SIZE[1] + 0.25 * rows + 0.2)
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=columns,
            fontsize=LEGEND_PT,
            title=title,
            title_fontsize=LEGEND_PT,
            frameon=False,
        )
    else:
        ax.legend(
            handles,
            labels,
            loc=loc,
            ncols=ncols,
            fontsize=LEGEND_PT,
            title=title,
            title_fontsize=LEGEND_PT,
            framealpha=0.9,
        )


def save_png(fig: Figure, path: Path) -> Path:
    # Render in memory first: the file then appears whole (atomic rename) or not at all.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
