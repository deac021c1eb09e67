"""Tables, CSV files and plots from a run directory or a sweep directory.

Figures and their provenance:

* accuracies are **final-round** test accuracies over clients (mean, sample-weighted mean,
  10th percentile), their hyperparameters (kNN-Per's lambda and k) chosen on each client's
  validation split;
* across seeds a table shows mean ± standard deviation (population, ddof = 0) over the
  seeds that completed;
* "best round" is the best evaluated round's mean accuracy, the round chosen on **test**: a
  test-tuned figure, labelled so wherever it appears; so are the "(oracle)" rows, whose
  hyperparameters were tuned on test.
"""

from __future__ import annotations

import csv
import io
import math
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from fedmem.errors import FedmemError
from fedmem.results import STATUS_COMPLETE, RunDir, atomic_write_text
from fedmem.sweep import Sweep

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
    "perfedavg": "Per-FedAvg",
    "mrperfedavg": "MR Per-FedAvg",
}

STRATEGY_NAMES = {
    "local": "local only",
    "fedavg": "FedAvg",
    "finetune": "FedAvg+FT",
    "knnper": "kNN-Per",
    "fedprox": "FedProx",
    "scaffold": "SCAFFOLD",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "ditto": "Ditto",
    "apfl": "APFL",
    "pfedme": "pFedMe",
    "fedper": "FedPer",
    "fedrep": "FedRep",
    "fedbn": "FedBN",
    "ifca": "IFCA",
    "perfedavg": "Per-FedAvg",
    "mrperfedavg": "MR Per-FedAvg",
}

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


def display_name(label: str, predictors: Sequence[str]) -> str:
    """A predictor's row name; personalizers on a personal model name it ("Ditto + kNN-Per").

    ``<label>@<k>`` (``eval.adapt_steps``) reads "<name>, <k> steps".
    """
    base, at, steps = label.partition("@")
    if at:
        return f"{display_name(base, predictors)}, {steps} step{'' if steps == '1' else 's'}"
    personal = [p for p in predictors if p not in ("global", "finetune", "knn") and "@" not in p]
    name = NAMES.get(label, label)
    if label in ("finetune", "knn") and personal:
        return f"{NAMES.get(personal[0], personal[0])} + {name}"
    return name


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
            table.add_row(display_name(label, predictors), *row)
    return table


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Print :func:`summary_table` (and :func:`label_noise_table` when labels were flipped)."""
    out = console or Console()
    out.print(summary_table(summary))
    noise = label_noise_table(summary)
    if noise is not None:
        out.print(noise)


# --------------------------------------------------------------------------- many federations


@dataclass(frozen=True)
class Result:
    """One completed federation as the reports see it."""

    name: str
    strategy: str
    seed: int
    grid: dict[str, str]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    lambda_grid: tuple[float, ...] = field(default=())

    @property
    def setting(self) -> str:
        """Strategy and grid values: what the seeds of one table row share."""
        return " ".join([self.strategy, *(f"{k}={v}" for k, v in self.grid.items())])

    @property
    def predictors(self) -> list[str]:
        return list(self.summary.get("predictors", list(self.summary.get("accuracy", {}))))

    @property
    def own(self) -> str:
        """The label of the strategy's own predictor."""
        own = self.summary.get("own_predictor")
        if own in self.predictors:
            return str(own)
        personal = [p for p in self.predictors if p not in ("global", "finetune", "knn")]
        return (
            personal[0]
            if personal
            else {"finetune": "finetune", "knnper": "knn"}.get(self.strategy, "global")
        )

    @property
    def title(self) -> str:
        """The setting for a reader: "Ditto", "FedProx mu=0.1"."""
        name = STRATEGY_NAMES.get(self.strategy, self.strategy)
        return " ".join([name, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.grid.items())])

    def name_of(self, label: str) -> str:
        return display_name(label, self.predictors)

    def final_clients(self) -> dict[int, dict[str, float]]:
        """Per-client metrics of the last evaluated round."""
        for record in reversed(self.metrics):
            if "clients" in record:
                return {int(p): m for p, m in record["clients"].items()}
        return {}


def load_result(path: Path, name: str | None = None, grid: Mapping[str, str] | None = None) -> Result:
    """A completed run directory as a :class:`Result` (an error naming it if it did not complete)."""
    run = RunDir(path)
    summary = run.summary()
    lambdas: tuple[float, ...] = ()
    config = path / "config.toml"
    if config.is_file():
        raw = tomllib.loads(config.read_text())
        lambdas = tuple(float(v) for v in raw.get("memory", {}).get("lambda_grid", ()))
    return Result(
        name or path.name,
        str(summary.get("strategy", "")),
        int(summary.get("seed", 0)),
        dict(grid or {}),
        summary,
        run.metrics(),
        lambdas,
    )


def load_sweep(path: Path) -> tuple[list[Result], list[tuple[str, str]]]:
    """The completed federations of a sweep directory, and (name, status) of those that did not complete."""
    sweep = Sweep(path)
    done, missing = [], []
    for name, grid in sweep.federations().items():
        run = RunDir(path / name)
        status = run.status()["status"] if (run.path / "status.json").is_file() else "not run"
        if status == STATUS_COMPLETE:
            done.append(load_result(run.path, name, grid))
        else:
            missing.append((name, str(status)))
    return done, missing


def load_any(path: Path) -> tuple[list[Result], list[tuple[str, str]], bool]:
    """A sweep directory or a single run directory: (results, incomplete federations, is_sweep)."""
    if (path / "sweep.toml").is_file():
        done, missing = load_sweep(path)
        return done, missing, True
    if (path / "status.json").is_file():
        return [load_result(path)], [], False
    raise FedmemError(f"{path} is neither a fedmem run directory nor a sweep directory")


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


def final_seen(group: Sequence[Result], key: str) -> list[dict[str, float]]:
    """Final-round metrics of every seen client of ``group``'s federations that report ``key``."""
    return [m for r in group for m in r.final_clients().values() if m.get("seen", 1.0) and key in m]


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
            rows.append(
                Row(group[0].title, label, display_name(label, predictors), dict(values), wall, len(group))
            )
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
    from fedmem import plots

    written: list[Path] = []
    groups = by_setting(results)
    lines = plot_lines(results, single)
    seeds = len({r.seed for r in results})

    series = {name: [curve(r, label) for r in groups[setting]] for name, (setting, label) in lines.items()}
    series = {k: v for k, v in series.items() if v and all(v)}
    if series:
        written.append(
            plots.accuracy_vs_round(
                series,
                out_dir / "accuracy_vs_round.png",
                title=f"{title}: accuracy vs round (seen clients)",
            )
        )

    one = single or len(groups) == 1
    curves = adaptation_curves(results, one)
    if curves:
        written.append(
            plots.accuracy_vs_round(
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
            plots.client_accuracy_ecdf(
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
            plots.gain_vs_entropy(
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
            plots.knn_lambda_across_clients(
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
