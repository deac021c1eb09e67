"""Tables from a run's summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

NAMES = {
    "global": "global",
    "finetune": "fine-tuned",
    "knn": "kNN-Per",
    "local": "local only",
    "ditto": "Ditto",
    "apfl": "APFL",
    "pfedme": "pFedMe",
    "fedper": "FedPer",
    "fedrep": "FedRep",
    "fedbn": "FedBN",
    "ifca": "IFCA",
}


def display_name(label: str, predictors: Sequence[str]) -> str:
    """A predictor's row name; personalizers on a personal model name it ("Ditto + kNN-Per")."""
    personal = [p for p in predictors if p not in ("global", "finetune", "knn")]
    name = NAMES.get(label, label)
    if label in ("finetune", "knn") and personal:
        return f"{NAMES.get(personal[0], personal[0])} + {name}"
    return name


def _pct(stats: Mapping[str, float] | None, key: str) -> str:
    return "-" if not stats else f"{100 * stats[key]:.1f}"


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
            ]
        ),
        caption="test accuracy (%) over clients after the last round; mean, sample-weighted mean, "
        "10th percentile; 'best' = best evaluated round's mean (seen), a test-tuned figure (the round "
        "is chosen on test); (oracle) = hyperparameters tuned on test",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("predictor")
    for group, n in (("seen", n_seen), ("unseen", n_unseen)):
        for stat in ("mean", "wtd", "p10"):
            table.add_column(f"{group}\n({n}) {stat}" if stat == "mean" else f"\n{stat}", justify="right")
    table.add_column("\nbest", justify="right")
    best = summary.get("best_round_mean_accuracy", {})
    predictors = summary.get("predictors", list(seen))
    for label in predictors:
        row = [display_name(label, predictors)]
        for stats in (seen.get(label), unseen.get(label)):
            row += [_pct(stats, "mean"), _pct(stats, "weighted_mean"), _pct(stats, "p10")]
        row.append("-" if label not in best else f"{100 * best[label]:.1f}")
        table.add_row(*row)
    oracle, unseen_oracle = summary.get("oracle_accuracy", {}), summary.get("unseen_oracle_accuracy", {})
    for label in oracle:
        row = [f"{display_name(label, predictors)} (oracle)"]
        for stats in (oracle.get(label), unseen_oracle.get(label)):
            row += [_pct(stats, "mean"), _pct(stats, "weighted_mean"), _pct(stats, "p10")]
        table.add_row(*row, "-", style="dim")
    return table


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Print :func:`summary_table`."""
    (console or Console()).print(summary_table(summary))
