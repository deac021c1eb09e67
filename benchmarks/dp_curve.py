"""Differential privacy against the leakage audit: membership AUC, canary exposure, accuracy and
epsilon at several noise multipliers (the curve of docs/benchmarks.md, "Client-level DP against the
audit").

For every value of ``--key`` (default ``update.noise_multiplier``: client-level DP, McMahan et al.,
ICLR 2018) and every seed this runs ``fedmem audit SCENARIO --set KEY=VALUE`` (in-process, one torch
thread, ``--jobs`` at a time), plus one reference point per seed with the ``--reference`` settings
applied after the ``--set`` ones (default: no clipping and no noise, the unprotected model), then
reads each audit with :func:`fedmem.reports.audit.analyze` and prints, per point and predictor, the mean
over seeds (± std) of:

- the test accuracy of the seen clients (final round; mean over clients);
- the loss-attack membership AUC (members = a seen client's train split, non-members = its test
  split; mean over seen clients);
- the exposure (bits) of the canaries inserted ``min(audit.repetitions)`` and
  ``max(audit.repetitions)`` times, and of the never-inserted ones (the null);
- epsilon at ``update.delta`` (``epsilon``; with ``--key strategy.dp_noise``, the per-example DP-SGD
  ``sample_epsilon``, a Poisson-sampling approximation), "none" where nothing is private.

It draws the three metrics against the setting into ``OUT/dp_curve.png``. Audits already complete
under ``--out`` are reused and unfinished ones resumed, so an interrupted study continues.

Usage::

    python benchmarks/dp_curve.py                                  # simulations/dp_audit.toml
    python benchmarks/dp_curve.py --key strategy.dp_noise --values 0.3,0.6,1,2 \\
        --set strategy.gradient=dpsgd --set update.noise_multiplier=0 --set update.clip_norm=0 \\
        --reference strategy.gradient=mean --out runs/dpsgd_curve    # sample-level DP-SGD
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray

from fedmem.reports.audit import analyze
from fedmem.reports.directories import TARGET, predictor_title
from fedmem.reports.figures import (
    DPI,
    LABEL_PT,
    LEGEND_PT,
    REFERENCE_GREY,
    SIZE,
    TICK_PT,
    TITLE_PT,
    error_line,
    new_axes,
    require_nonempty,
    save_png,
)
from fedmem.results import RunDir


@dataclass(frozen=True)
class Point:
    """One audited setting at one seed; ``value`` is None for the reference point."""

    value: str | None
    seed: int

    @property
    def folder(self) -> str:
        return f"{'reference' if self.value is None else 'v' + self.value}-s{self.seed}"


def audit_dir(parent: Path) -> Path | None:
    found = sorted(p for p in parent.glob("audit-*") if p.is_dir()) if parent.is_dir() else []
    return found[-1] if found else None


def run_point(args: argparse.Namespace, point: Point) -> Path | None:
    """Run (or resume, or reuse) the audit of one point; its directory once complete, else None."""
    parent = args.out / point.folder
    found = audit_dir(parent)
    if found is not None and (found / "report.md").is_file():
        return found
    if args.no_run:
        return None
    sets = [*args.set, f"seed={point.seed}"]
    sets += [f"{args.key}={point.value}"] if point.value is not None else list(args.reference)
    cmd = [sys.executable, "-m", "fedmem.cli", "audit", args.scenario, "--engine", "inprocess"]
    cmd += [a for s in sets for a in ("--set", s)] + ["--out", str(parent)]
    if found is not None:
        cmd += ["--resume", str(found)]
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / "audit.log", "a") as log:
        done = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT)
    found = audit_dir(parent)
    if done.returncode != 0 or found is None or not (found / "report.md").is_file():
        print(f"{point.folder}: the audit did not complete; see {parent / 'audit.log'}", file=sys.stderr)
        return None
    return found


def failure(args: argparse.Namespace, point: Point) -> str:
    """Why the audit of ``point`` did not complete, from its target run's status ("not run" if none)."""
    found = audit_dir(args.out / point.folder)
    if found is None or not (found / TARGET / "status.json").is_file():
        return "not run"
    return str(RunDir(found / TARGET).status().get("error", "did not complete"))


def measure(root: Path, epsilon_key: str) -> dict[str, dict[str, float]]:
    """Per predictor: accuracy, mia_auc, exposure at the fewest and most repetitions, the null, epsilon."""
    found = analyze(root)
    summary = RunDir(root / TARGET).summary()
    reps = found.cfg.audit.repetitions
    eps = float(summary.get(epsilon_key, np.nan))
    return {
        row["predictor"]: {
            "accuracy": row["accuracy"],
            "mia_auc": row["mia_auc"],
            "exposure_few": row.get(f"exposure_r{min(reps)}", np.nan),
            "exposure": row.get(f"exposure_r{max(reps)}", np.nan),
            "exposure_never": row.get("exposure_never", np.nan),
            "epsilon": eps,
            "few": float(min(reps)),
            "repetitions": float(max(reps)),
        }
        for row in found.leakage
    }


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    a = scale * np.asarray([v for v in values if np.isfinite(v)], np.float64)
    if not len(a):
        return "-"
    return f"{a.mean():.{digits}f}" if len(a) == 1 else f"{a.mean():.{digits}f} ± {a.std():.{digits}f}"


def _eps(values: Sequence[float]) -> str:
    a = np.asarray(values, np.float64)
    if not len(a):
        return "-"  # no audit completed
    if np.isnan(a).all():
        return "none"  # nothing private
    lo, hi = np.nanmin(a), np.nanmax(a)
    return f"{lo:.3g}" if np.isclose(lo, hi, rtol=1e-6) else f"{lo:.3g}-{hi:.3g}"


def _short(eps: str) -> str:
    """A tick's epsilon: '4.44e+05' -> '4e5', '43.7' -> '44'; a range over seeds shows its high end."""
    try:
        v = float(eps.split("-")[-1])
    except ValueError:
        return eps
    if v >= 1000:
        mantissa, exponent = f"{v:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{v:.2g}" if v < 10 else f"{v:.0f}"


# --------------------------------------------------------------------------- the figure


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
        require_nonempty(series, f"the series of panel {ylabel!r}")
        for name, values in series.items():
            if len(values) != len(settings):
                raise ValueError(
                    f"series {name!r} of panel {ylabel!r} has {len(values)} settings, "
                    f"expected {len(settings)}."
                )
            if name not in names:
                names.append(str(name))
    fig = Figure(figsize=(3.3 * len(panels) + 0.6, SIZE[1] + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(settings))
    for j, (ylabel, series, reference) in enumerate(panels):
        ax = new_axes(fig, 1, len(panels), j + 1)
        if reference is not None:
            ax.axhline(reference, color=REFERENCE_GREY, linestyle="--", linewidth=1.0)
        for name, values in series.items():
            xs, mean, std = setting_points(values)
            if not xs:
                raise ValueError(f"series {name!r} of panel {ylabel!r} has nothing to draw.")
            error_line(ax, names.index(str(name)), x[xs], mean, std, str(name))
        ax.set_xticks(x, list(settings), fontsize=TICK_PT - 1)
        ax.set_ylabel(ylabel, fontsize=LABEL_PT)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    for ax in fig.axes[1:]:  # a series absent from the first panel still gets its legend entry
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.suptitle(title, fontsize=TITLE_PT)
    fig.supxlabel(xlabel, fontsize=LABEL_PT)  # once: the panels share their settings
    fig.legend(
        handles,
        labels,
        loc="outside right upper",
        ncols=1,
        fontsize=LEGEND_PT,
        frameon=False,
    )
    return save_png(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenario", nargs="?", default="dp_audit")
    parser.add_argument("--key", default="update.noise_multiplier", help="the config key the curve varies")
    parser.add_argument("--values", default="0,0.03,0.1,0.2,0.3,1", help="comma-separated values of --key")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--reference",
        action="append",
        default=None,
        help="KEY=VALUE of the reference point, repeatable (default: update.clip_norm=0 and no noise)",
    )
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every audit")
    parser.add_argument("--out", type=Path, default=Path("runs/dp_curve"))
    parser.add_argument("--jobs", type=int, default=2, help="audits at a time (one torch thread each)")
    parser.add_argument("--no-run", action="store_true", help="report the audits under --out, run nothing")
    args = parser.parse_args()
    if args.reference is None:
        args.reference = ["update.clip_norm=0", "update.noise_multiplier=0"]
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    settings: list[str | None] = [None, *values]
    points = [Point(v, s) for v in settings for s in seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        dirs = dict(zip(points, pool.map(lambda p: run_point(args, p), points), strict=True))
    epsilon_key = "sample_epsilon" if args.key.startswith("strategy.dp_") else "epsilon"
    found = {p: measure(d, epsilon_key) for p, d in dirs.items() if d is not None}
    if not found:
        raise SystemExit(f"no complete audit under {args.out}")
    predictors = list(next(iter(found.values())))
    first = next(iter(next(iter(found.values())).values()))
    few, top = int(first["few"]), int(first["repetitions"])
    reference = "; ".join(args.reference)
    print(
        f"\n## {args.scenario}: {args.key} against the audit (final round; mean ± std over the seeds "
        f"that completed, of {args.seeds}; seen clients; reference point: {reference})\n"
    )
    heads = ["accuracy %", "MIA AUC", f"exposure r{few} (bits)", f"exposure r{top}", "exposure never"]
    print(f"| {args.key} | ε | seeds | predictor | " + " | ".join(heads) + " |")
    print("|---|---|---:|---|" + "---:|" * len(heads))
    ticks: list[str] = []
    series: dict[str, dict[str, list[list[float]]]] = {m: {p: [] for p in predictors} for m in _METRICS}
    drawn = [v for v in settings if any(p.value == v and p in found for p in points)]
    for v in drawn:
        runs = [found[p] for p in points if p.value == v and p in found]
        eps = _eps([r[predictors[0]]["epsilon"] for r in runs])
        name = "reference" if v is None else v
        ticks.append(f"{'ref.' if v is None else v}\nε {_short(eps)}")
        for label in predictors:
            cols = {m: [r[label][m] for r in runs] for m in (*_METRICS, "exposure_never")}
            cells = [
                _fmt(cols["accuracy"], 100),
                _fmt(cols["mia_auc"], digits=3),
                _fmt(cols["exposure_few"], digits=2),
                _fmt(cols["exposure"], digits=2),
                _fmt(cols["exposure_never"], digits=2),
            ]
            print(f"| {name} | {eps} | {len(runs)} | {label} | " + " | ".join(cells) + " |")
            for m in _METRICS:
                scale = 100.0 if m == "accuracy" else 1.0
                series[m][label].append([scale * x for x in cols[m]])
    failed = [p for p in points if p not in found]
    if failed:
        print(
            "\naudits that did not complete (their settings are left out of the figure if no seed completed):"
        )
        for p in failed:
            print(f"- {p.folder}: {failure(args, p)}")
    null = float(np.nanmean([r[p]["exposure_never"] for r in found.values() for p in predictors]))
    summary = RunDir(next(d for d in dirs.values() if d is not None) / TARGET).summary()  # the titles
    series = {m: {predictor_title(summary, p): v for p, v in by.items()} for m, by in series.items()}
    # DP-SGD's epsilon is per example and accounted as Poisson sampling (docs/privacy.md)
    what = "ε" if epsilon_key == "epsilon" else "sample ε (Poisson approx., worst client)"
    path = metric_panels(
        ticks,
        [
            ("test accuracy (%), seen clients", series["accuracy"], None),
            ("membership AUC (loss attack)", series["mia_auc"], 0.5),
            (f"exposure (bits), canaries inserted {_times(few)}", series["exposure_few"], null),
            (f"exposure (bits), canaries inserted {_times(top)}", series["exposure"], null),
        ],
        args.out / "dp_curve.png",
        title=f"{args.scenario}: accuracy and leakage against {args.key} "
        f"(final round, mean ± std over seeds {args.seeds})",
        xlabel=f"{args.key}, {what} at δ = update.delta (ref.: {reference})",
    )
    print(f"\nwrote {path} (dashed: AUC 0.5 and the never-inserted canaries' mean exposure)")


_METRICS = ("accuracy", "mia_auc", "exposure_few", "exposure")


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


if __name__ == "__main__":
    main()
