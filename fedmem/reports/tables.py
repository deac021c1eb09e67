"""The tables of run and sweep directories: rich tables, Markdown and CSV.

A run's table (:func:`summary_table`, :func:`label_noise_table`), the comparison of many
federations grouped by setting (:func:`comparison_table`, :func:`comparison_markdown`), and the
rows of ``results.csv`` and ``per_client.csv``. Row names are the titles the engine recorded in
``summary.json`` (:func:`fedmem.reports.directories.predictor_title`).
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from fedmem.reports.directories import Result, predictor_title
from fedmem.results import atomic_write_text

TEST_TUNED_NOTE = (
    "'best' = best evaluated round's mean (seen clients), the round chosen on test: a test-tuned "
    "figure; (oracle) = hyperparameters tuned on test"
)


SAMPLE_PRIVACY_NOTE = (
    "sample ε = DP-SGD per example of the worst training client's uploads, Poisson-subsampled RDP as an "
    "approximation of shuffled batches"
)
PRIVACY_NOTE = (
    "ε = client-level DP of the training updates (the global model), not of what a client "
    "builds from its own data (fine-tuning, kNN-Per's memory)"
)


def _pct(stats: Mapping[str, float] | None, key: str) -> str:
    return "-" if not stats else f"{100 * stats[key]:.1f}"


def privacy_note(summary: Mapping[str, Any]) -> str:
    """ "ε 2.31 at δ 1e-05 (rdp)" for client-level DP (``epsilon`` in the summary), "" without.

    With sample-level DP-SGD (``sample_epsilon``) it adds "sample ε 4.10 at δ 1e-05 (Poisson
    approx.)": the worst training client's, next to the client-level figure when both are on.
    """
    notes = []
    if "epsilon" in summary:
        notes.append(
            f"ε {summary['epsilon']:.2f} at δ {summary['delta']:g} ({summary.get('accountant', '?')})"
        )
    if "sample_epsilon" in summary:
        notes.append(
            f"sample ε {summary['sample_epsilon']:.2f} at δ {summary['sample_delta']:g} (Poisson approx.)"
        )
    return " · ".join(notes)


def summary_table(summary: Mapping[str, Any]) -> Table:
    """Accuracy (%) per predictor: mean / sample-weighted mean / 10th percentile, seen and unseen clients."""
    seen, unseen = summary.get("accuracy", {}), summary.get("unseen_accuracy", {})
    n_seen = next(iter(seen.values()), {"clients": 0})["clients"]
    n_unseen = next(iter(unseen.values()), {"clients": 0})["clients"]
    table = Table(
        title=" · ".join(
            [
                str(summary.get("scenario", "")),
                str(summary.get("strategy", "")),
                f"{summary.get('rounds', '?')} rounds",
                f"seed {summary.get('seed', '?')}",
                *([privacy_note(summary)] if privacy_note(summary) else []),
            ]
        ),
        caption="test accuracy (%) over clients after the last round; mean, sample-weighted mean, "
        "10th percentile; "
        + TEST_TUNED_NOTE
        + ("; " + PRIVACY_NOTE if "epsilon" in summary else "")
        + ("; " + SAMPLE_PRIVACY_NOTE if "sample_epsilon" in summary else ""),
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("predictor")
    for group, n in (("seen", n_seen), ("unseen", n_unseen)):
        for stat in ("mean", "wtd", "p10"):
            table.add_column(f"{group}\n({n}) {stat}" if stat == "mean" else f"\n{stat}", justify="right")
    table.add_column("best\n(test-tuned)", justify="right")
    best = summary.get("best_round_mean_accuracy", {})
    predictors = summary.get("predictors", list(seen))
    for label in predictors:
        row = [predictor_title(summary, label)]
        for stats in (seen.get(label), unseen.get(label)):
            row += [_pct(stats, "mean"), _pct(stats, "weighted_mean"), _pct(stats, "p10")]
        row.append("-" if label not in best else f"{100 * best[label]:.1f}")
        table.add_row(*row)
    oracle, unseen_oracle = summary.get("oracle_accuracy", {}), summary.get("unseen_oracle_accuracy", {})
    for label in oracle:
        row = [f"{predictor_title(summary, label)} (oracle)"]
        for stats in (oracle.get(label), unseen_oracle.get(label)):
            row += [_pct(stats, "mean"), _pct(stats, "weighted_mean"), _pct(stats, "p10")]
        table.add_row(*row, "-", style="dim")
    return table


def label_noise_table(summary: Mapping[str, Any]) -> Table | None:
    """Accuracy (%) on the flipped train examples per predictor, or None without label noise.

    Against the noisy labels (memorization: the noise the predictor fits) and against the original
    ones, as a mean over the noisy seen clients and weighted by their flipped examples. With
    ``noisy_cscore_auc`` in the summary, two more columns: the AUC of finding the flipped examples
    by low learning speed (a C-score proxy), mean over clients and pooled ("-" for predictors whose
    correctness was not recorded).
    """
    memorized, true = summary.get("noisy_memorized"), summary.get("noisy_true", {})
    if not memorized:
        return None
    cscore = summary.get("noisy_cscore_auc")
    n = next(iter(memorized.values()))["clients"]
    caption = (
        "accuracy (%) on the flipped train examples against their noisy labels (memorized) "
        "and their original labels (true); mean over noisy clients, weighted by flipped examples"
    )
    if cscore is not None:
        caption += "; C-score AUC: flipped examples ranked by low learning speed (0.5 = chance)"
    table = Table(
        title="flipped train labels (data.label_noise)",
        caption=caption,
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("predictor")
    table.add_column(f"memorized\n({n}) mean", justify="right")
    table.add_column("\nwtd", justify="right")
    table.add_column("true\nmean", justify="right")
    table.add_column("\nwtd", justify="right")
    if cscore is not None:
        table.add_column("C-score AUC\nmean", justify="right")
        table.add_column("\npooled", justify="right")
    predictors = summary.get("predictors", list(memorized))
    for label in predictors:
        if label in memorized:
            m, t = memorized[label], true.get(label)
            row = [_pct(m, "mean"), _pct(m, "weighted_mean"), _pct(t, "mean"), _pct(t, "weighted_mean")]
            if cscore is not None:
                a = cscore.get(label)
                row += ["-", "-"] if a is None else [f"{a['mean']:.3f}", f"{a['pooled']:.3f}"]
            table.add_row(predictor_title(summary, label), *row)
    return table


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Print :func:`summary_table` (and :func:`label_noise_table` when labels were flipped)."""
    out = console or Console()
    out.print(summary_table(summary))
    noise = label_noise_table(summary)
    if noise is not None:
        out.print(noise)


# --------------------------------------------------------------------------- CSV


def grid_keys(results: Sequence[Result]) -> list[str]:
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.grid if k not in keys]
    return keys


RESULT_COLUMNS = [
    "federation",
    "strategy",
    "seed",
    "predictor",
    "group",
    "statistic",
    "value",
    "test_tuned",
    "rounds",
    "wall_seconds",
    "epsilon",
    "delta",
]
PER_CLIENT_COLUMNS = [
    "federation",
    "strategy",
    "seed",
    "client",
    "seen",
    "label_entropy",
    "n_test",
    "predictor",
    "accuracy",
    "knn_lambda",
    "knn_k",
]


def result_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """``results.csv``: one row per federation x predictor x client group x statistic.

    ``statistic`` is ``mean``, ``weighted_mean``, ``p10`` or ``clients`` of the final round;
    with label noise, groups ``flipped_noisy_label`` / ``flipped_true_label`` hold the accuracy on
    the flipped train examples of the noisy seen clients against their noisy / original labels;
    ``best_round_mean`` / ``best_round_weighted_mean`` (seen clients) and predictors named
    ``<label>_oracle`` carry ``test_tuned = True``.
    """
    rows: list[dict[str, Any]] = []
    for r in results:
        base = {
            "federation": r.name,
            "strategy": r.strategy,
            "seed": r.seed,
            **r.grid,
            "rounds": r.summary.get("rounds"),
            "wall_seconds": r.summary.get("wall_seconds"),
            "epsilon": r.summary.get("epsilon", ""),  # empty: no noise, no guarantee
            "delta": r.summary.get("delta", ""),
        }
        s = r.summary
        for group, key, suffix, tuned in (
            ("seen", "accuracy", "", False),
            ("unseen", "unseen_accuracy", "", False),
            ("seen", "oracle_accuracy", "_oracle", True),
            ("unseen", "unseen_oracle_accuracy", "_oracle", True),
            ("flipped_noisy_label", "noisy_memorized", "", False),
            ("flipped_true_label", "noisy_true", "", False),
        ):
            for label, stats in s.get(key, {}).items():
                for stat in ("mean", "weighted_mean", "p10", "clients"):
                    rows.append(
                        {
                            **base,
                            "predictor": label + suffix,
                            "group": group,
                            "statistic": stat,
                            "value": stats[stat],
                            "test_tuned": tuned,
                        }
                    )
        for stat, key in (
            ("best_round_mean", "best_round_mean_accuracy"),
            ("best_round_weighted_mean", "best_round_weighted_accuracy"),
        ):
            for label, value in s.get(key, {}).items():
                rows.append(
                    {**base, "predictor": label, "group": "seen", "statistic": stat, "value": value}
                    | {"test_tuned": True}
                )
    return rows


def per_client_rows(results: Sequence[Result]) -> list[dict[str, Any]]:
    """``per_client.csv``: one row per federation x client x predictor (final round)."""
    rows: list[dict[str, Any]] = []
    for r in results:
        for pid, m in sorted(r.final_clients().items()):
            for label in r.predictors:
                if f"acc/{label}" not in m:
                    continue
                rows.append(
                    {
                        "federation": r.name,
                        "strategy": r.strategy,
                        "seed": r.seed,
                        **r.grid,
                        "client": pid,
                        "seen": bool(m.get("seen", 1.0)),
                        "label_entropy": m.get("label_entropy", ""),
                        "n_test": int(m["n_test"]),
                        "predictor": label,
                        "accuracy": m[f"acc/{label}"],
                        "knn_lambda": m.get(f"{label}/lambda", ""),
                        "knn_k": int(m[f"{label}/k"]) if f"{label}/k" in m else "",
                    }
                )
    return rows


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write rows with the given columns (missing values empty), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- the comparison table


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a setting's predictor, each figure as values over seeds."""

    setting: str
    label: str
    name: str
    values: dict[str, list[float]]  # "<group>/<stat>" -> one value per seed
    wall: list[float]
    seeds: int


def by_setting(results: Sequence[Result]) -> dict[str, list[Result]]:
    """Federations grouped by setting (strategy and grid values), in order of first appearance."""
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        groups[r.setting].append(r)
    return dict(groups)


def comparison_rows(results: Sequence[Result]) -> list[Row]:
    """Group federations by setting; per predictor collect each statistic over seeds."""
    rows = []
    for group in by_setting(results).values():
        predictors = group[0].predictors
        for label in predictors:
            values: dict[str, list[float]] = defaultdict(list)
            for r in group:
                for g, key in (("seen", "accuracy"), ("unseen", "unseen_accuracy")):
                    stats = r.summary.get(key, {}).get(label)
                    if stats:
                        for stat in ("mean", "weighted_mean", "p10"):
                            values[f"{g}/{stat}"].append(stats[stat])
                best = r.summary.get("best_round_mean_accuracy", {}).get(label)
                if best is not None:
                    values["best"].append(best)
                values["epsilon"].append(float(r.summary.get("epsilon", math.inf)))
                for key, name in (("noisy_memorized", "memorized"), ("noisy_true", "noisy_true")):
                    stats = r.summary.get(key, {}).get(label)
                    if stats:
                        values[name].append(stats["mean"])
            wall = [float(r.summary.get("wall_seconds", math.nan)) for r in group]
            rows.append(Row(group[0].title, label, group[0].name_of(label), dict(values), wall, len(group)))
    return rows


def _pm(values: Sequence[float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    a = np.asarray(values, np.float64) * scale
    if len(a) == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}"


COMPARISON_COLUMNS = [
    ("seen/mean", "seen mean"),
    ("seen/weighted_mean", "seen wtd"),
    ("seen/p10", "seen p10"),
    ("unseen/mean", "unseen mean"),
    ("unseen/weighted_mean", "unseen wtd"),
    ("unseen/p10", "unseen p10"),
    ("best", "best (test-tuned)"),
]


# with data.label_noise: accuracy on the flipped train examples of the noisy seen clients
NOISE_COLUMNS = [("memorized", "flipped memorized"), ("noisy_true", "flipped true")]


def with_label_noise(results: Sequence[Result]) -> bool:
    """Whether a comparison shows the label-noise columns: some federation flipped labels."""
    return any(r.summary.get("noisy_memorized") for r in results)


def _columns(results: Sequence[Result]) -> list[tuple[str, str]]:
    return COMPARISON_COLUMNS + (NOISE_COLUMNS if with_label_noise(results) else [])


def with_epsilon(results: Sequence[Result]) -> bool:
    """Whether a comparison shows an ε column: some federation ran with client-level DP."""
    return any("epsilon" in r.summary for r in results)


def _eps(values: Sequence[float] | None) -> str:
    # inf: no noise, no guarantee; seeds of one setting share their epsilon (it does not depend on
    # data), so one value is shown, and a spread only if they differ (never inf - inf)
    if not values:
        return "-"
    if len(set(values)) == 1:
        return f"{values[0]:.2f}"
    return _pm(values, 1.0, 2)


def comparison_caption(results: Sequence[Result]) -> str:
    seeds = sorted({r.seed for r in results})
    rounds = sorted({int(r.summary.get("rounds", 0)) for r in results})
    return (
        f"test accuracy (%) over clients after the final round ({', '.join(map(str, rounds))} rounds), "
        f"mean ± std over seeds {', '.join(map(str, seeds))} (one figure: one seed); mean, sample-weighted "
        f"mean, 10th percentile (bottom decile) of clients; wall = seconds per federation; {TEST_TUNED_NOTE}"
        + (f"; {PRIVACY_NOTE}, at δ {_deltas(results)} (inf: no noise)" if with_epsilon(results) else "")
        + (f"; {NOISE_NOTE}" if with_label_noise(results) else "")
    )


NOISE_NOTE = (
    "flipped memorized / true: accuracy (%) on the flipped train examples of the noisy seen clients "
    "against their noisy / original labels (data.label_noise), mean over those clients"
)


def _deltas(results: Sequence[Result]) -> str:
    return ", ".join(sorted({f"{r.summary['delta']:g}" for r in results if "delta" in r.summary}))


def comparison_table(results: Sequence[Result], title: str = "") -> Table:
    """The rich table of :func:`comparison_rows`."""
    table = Table(title=title, caption=comparison_caption(results), box=box.SIMPLE_HEAD, padding=(0, 1))
    eps = with_epsilon(results)
    columns = _columns(results)
    for head in (
        "setting",
        "predictor",
        *(h for _, h in columns),
        *(["ε"] * eps),
        "wall s",
        "seeds",
    ):
        table.add_column(
            head.replace(" ", "\n", 1), justify="left" if head in ("setting", "predictor") else "right"
        )
    previous = None
    for row in comparison_rows(results):
        cells = [_pm(row.values.get(key)) for key, _ in columns]
        table.add_row(
            row.setting if row.setting != previous else "",
            row.name,
            *cells,
            *([_eps(row.values.get("epsilon"))] * eps),
            _pm(row.wall, 1.0, 0),
            str(row.seeds),
        )
        previous = row.setting
    return table


def comparison_markdown(results: Sequence[Result]) -> str:
    """The same table in Markdown, with its caption."""
    eps = with_epsilon(results)
    columns = _columns(results)
    heads = ["setting", "predictor", *(h for _, h in columns), *(["ε"] * eps), "wall s", "seeds"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(heads) - 2)) + "|"]
    for row in comparison_rows(results):
        cells = [_pm(row.values.get(key)) for key, _ in columns]
        cells += [_eps(row.values.get("epsilon"))] * eps
        lines.append(
            "| " + " | ".join([row.setting, row.name, *cells, _pm(row.wall, 1.0, 0), str(row.seeds)]) + " |"
        )
    return "\n".join(lines) + "\n\n" + comparison_caption(results) + "\n"
