"""The report of a run or sweep directory: ``results.csv``, ``per_client.csv``, ``report.md`` and its plots.

:func:`render` (re)writes everything ``fedmem report DIR`` writes for a run or a sweep; which
figures apply, and which line each shows, is decided here (:func:`plot_lines`,
:func:`render_plots`); the figures are drawn by :mod:`fedmem.reports.run_figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedmem.errors import FedmemError
from fedmem.reports.directories import Result, load_any
from fedmem.reports.tables import (
    PER_CLIENT_COLUMNS,
    RESULT_COLUMNS,
    by_setting,
    comparison_markdown,
    grid_keys,
    per_client_rows,
    result_rows,
    write_csv,
)
from fedmem.results import atomic_write_text


def final_seen(group: Sequence[Result], key: str) -> list[dict[str, float]]:
    """Final-round metrics of every seen client of ``group``'s federations that report ``key``."""
    return [m for r in group for m in r.final_clients().values() if m.get("seen", 1.0) and key in m]


# --------------------------------------------------------------------------- plots


def curve(result: Result, label: str, group: str = "accuracy") -> list[tuple[int, float]]:
    """(round, mean accuracy over seen clients) of one predictor, from ``metrics.jsonl``."""
    return [
        (int(m["round"]), float(m[group][label]["mean"])) for m in result.metrics if label in m.get(group, {})
    ]


def plot_lines(results: Sequence[Result], single: bool) -> dict[str, tuple[str, str]]:
    """Which (setting, predictor label) each plotted line shows, by line name.

    A single run shows every predictor but the points of adaptation curves (``<label>@<k>``,
    ``eval.adapt_steps``: they are in the tables). A sweep shows, per setting, its own predictor
    and kNN-Per over it, plus one global model when no setting's own predictor is one (the
    reference every personalized line is measured against).
    """
    if single:
        r = results[0]
        return {r.name_of(label): (r.setting, label) for label in r.predictors if "@" not in label}
    first: dict[str, Result] = {}
    for r in results:
        first.setdefault(r.setting, r)
    lines: dict[str, tuple[str, str]] = {}
    for setting, r in first.items():
        lines[r.title + (" (global model)" if r.own == "global" else "")] = (setting, r.own)
        if "knn" in r.predictors and r.own != "knn":
            lines[f"{r.title} + kNN-Per"] = (setting, "knn")
    if all(r.own != "global" for r in first.values()):
        ref = next((r for r in first.values() if "global" in r.predictors), None)
        if ref is not None:
            lines[f"{ref.title}: global model"] = (ref.setting, "global")
    return lines


def adaptation_curves(results: Sequence[Result], one: bool) -> dict[str, list[list[tuple[int, float]]]]:
    """Final-round accuracy after each of ``eval.adapt_steps`` (labels ``<label>@<k>``), by line.

    One line per adapting predictor and client group (seen, unseen), one point list per seed;
    ``one``: a single setting, so lines need not name it.
    """
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for r in results:
        for kind, who in (("accuracy", "seen"), ("unseen_accuracy", "unseen")):
            points: dict[str, list[tuple[int, float]]] = {}
            for label, stats in r.summary.get(kind, {}).items():
                base, at, steps = label.partition("@")
                if at:
                    points.setdefault(base, []).append((int(steps), float(stats["mean"])))
            for base, pts in points.items():
                name = r.name_of(base)
                if not (one or name.startswith(r.title)):  # "Per-FedAvg + fine-tuned" names its setting
                    name = f"{r.title} · {name}"
                curves.setdefault(f"{name}, {who} clients", []).append(sorted(pts))
    return curves


def render_plots(results: Sequence[Result], out_dir: Path, single: bool, title: str) -> list[Path]:
    """Write the PNGs that apply to these results into ``out_dir``; return their paths."""
    from fedmem.reports import run_figures  # matplotlib is imported only when figures are drawn

    written: list[Path] = []
    groups = by_setting(results)
    lines = plot_lines(results, single)
    seeds = len({r.seed for r in results})

    series = {name: [curve(r, label) for r in groups[setting]] for name, (setting, label) in lines.items()}
    series = {k: v for k, v in series.items() if v and all(v)}
    if series:
        written.append(
            run_figures.accuracy_vs_round(
                series,
                out_dir / "accuracy_vs_round.png",
                title=f"{title}: accuracy vs round (seen clients)",
            )
        )

    one = single or len(groups) == 1
    curves = adaptation_curves(results, one)
    if curves:
        written.append(
            run_figures.accuracy_vs_round(
                curves,
                out_dir / "adaptation.png",
                title=f"{title}: accuracy after local adaptation steps (final round)",
                xlabel="local adaptation steps (eval.adapt_steps)",
            )
        )

    accs: dict[str, list[float]] = {}
    for name, (setting, label) in lines.items():
        values = [m[f"acc/{label}"] for m in final_seen(groups[setting], f"acc/{label}")]
        if values:
            accs[name] = values
    if accs:
        written.append(
            run_figures.client_accuracy_ecdf(
                accs,
                out_dir / "client_accuracy.png",
                title=f"{title}: per-client accuracy, final round"
                + (f" ({seeds} seeds pooled)" if seeds > 1 else ""),
            )
        )

    # Every personalized predictor of a single run (or of a one-setting sweep); a setting's own
    # predictor otherwise: one question per figure, not every predictor of every setting.
    gains: dict[str, tuple[list[float], list[float]]] = {}
    for group in groups.values():
        r0 = group[0]
        if "global" not in r0.predictors:
            continue
        for label in r0.predictors:
            if label == "global" or "@" in label or not (one or label == r0.own):
                continue
            pairs = [
                (float(m["label_entropy"]), float(m[f"acc/{label}"] - m["acc/global"]))
                for m in final_seen(group, f"acc/{label}")
                if "label_entropy" in m
            ]
            if pairs:
                name = r0.name_of(label) if one else r0.title
                gains[name] = ([x for x, _ in pairs], [y for _, y in pairs])
    if gains:
        written.append(
            run_figures.gain_vs_entropy(
                gains,
                out_dir / "gain_vs_entropy.png",
                title=f"{title}: personalization gain per client (seen, final round)",
            )
        )

    lambdas: dict[str, list[float]] = {}
    grid: tuple[float, ...] = ()
    for group in groups.values():
        values = [
            float(m["knn/lambda"]) for r in group for m in r.final_clients().values() if "knn/lambda" in m
        ]
        if values:
            lambdas[f"{group[0].title} + kNN-Per"] = values
            grid = grid or group[0].lambda_grid
    if lambdas:
        written.append(
            run_figures.knn_lambda_across_clients(
                lambdas,
                out_dir / "knn_lambda.png",
                title=f"{title}: kNN-Per's λ per client (all clients, final round)",
                grid=list(grid) or None,
            )
        )
    return written


# --------------------------------------------------------------------------- everything


def environment_lines(results: Sequence[Result]) -> list[str]:
    """Markdown lines naming the versions the federations ran under (``summary.json``'s ``environment``).

    Numbers move between library versions, so a report says which produced it; federations that
    ran under different versions (a sweep resumed after an upgrade) are listed by version.
    """
    by_env: dict[str, list[str]] = {}
    for r in results:
        env = r.summary.get("environment")
        text = ", ".join(f"{k} {v}" for k, v in env.items()) if env else "not recorded (an older run)"
        by_env.setdefault(text, []).append(r.name)
    if len(by_env) == 1:
        return [f"Versions: {next(iter(by_env))}.", ""]
    lines = [
        "The federations ran under different versions, so their numbers may differ for that reason too:",
        "",
    ]
    return lines + [f"- {text}: {', '.join(names)}" for text, names in by_env.items()] + [""]


def render(path: Path) -> tuple[list[Result], list[Path]]:
    """(Re)write the report of a run or sweep directory: CSVs and plots (sweep), ``report.md``."""
    results, missing, is_sweep = load_any(path)
    if not results:
        raise FedmemError(f"{path}: no federation completed, nothing to report")
    title = str(results[0].summary.get("scenario", path.name))
    written: list[Path] = []
    if is_sweep:
        keys = grid_keys(results)
        cols = RESULT_COLUMNS[:3] + keys + RESULT_COLUMNS[3:]
        write_csv(path / "results.csv", result_rows(results), cols)
        write_csv(
            path / "per_client.csv",
            per_client_rows(results),
            PER_CLIENT_COLUMNS[:3] + keys + PER_CLIENT_COLUMNS[3:],
        )
        written += [path / "results.csv", path / "per_client.csv"]
        pngs = render_plots(results, path / "plots", single=False, title=title)
    else:
        pngs = render_plots(results, path, single=True, title=title)
    written += pngs
    md = [f"# {title}: {'sweep' if is_sweep else 'run'} report", "", comparison_markdown(results)]
    md += environment_lines(results)
    if missing:
        md += ["Federations that did not complete (left out of every figure):", ""]
        md += [f"- {name}: {status}" for name, status in missing] + [""]
    for png in pngs:
        md += [f"![{png.stem.replace('_', ' ')}]({png.relative_to(path).as_posix()})", ""]
    atomic_write_text(path / "report.md", "\n".join(md))
    written.append(path / "report.md")
    return results, written
