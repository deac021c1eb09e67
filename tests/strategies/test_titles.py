"""Display titles: each strategy names itself, and the engine's titles read as the reports' old tables did."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from rich.console import Console

from fedmem.client import labels, titles
from fedmem.config import Config
from fedmem.reports.tables import summary_table
from strategies import STRATEGIES

# The reports' name tables before titles moved onto the strategies (fedmem/report.py), verbatim:
# the oracle the engine's titles must reproduce.
OLD_NAMES = {
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
OLD_STRATEGY_NAMES = {
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
EXTRA = {"fedbn": ("model.name=cnn_bn",)}


def old_display_name(label: str, predictors: Sequence[str]) -> str:
    """``fedmem.report.display_name`` as it was."""
    base, at, steps = label.partition("@")
    if at:
        return f"{old_display_name(base, predictors)}, {steps} step{'' if steps == '1' else 's'}"
    personal = [p for p in predictors if p not in ("global", "finetune", "knn") and "@" not in p]
    name = OLD_NAMES.get(label, label)
    if label in ("finetune", "knn") and personal:
        return f"{OLD_NAMES.get(personal[0], personal[0])} + {name}"
    return name


def test_every_strategy_has_a_title() -> None:
    assert set(OLD_STRATEGY_NAMES) == set(STRATEGIES.names())
    for name, cls in STRATEGIES.items():
        assert cls.title.strip(), f"{cls.__name__} has no title"
        # a strategy's title names the setting as the old table did; its predictor's, the row
        assert cls.title == OLD_STRATEGY_NAMES[name]
        label = cls.label if cls.label != "global" else name
        assert (cls.predictor_title or cls.title) == OLD_NAMES.get(label, OLD_STRATEGY_NAMES[name])


@pytest.mark.parametrize("name", sorted(OLD_STRATEGY_NAMES))
def test_titles_read_as_the_old_tables(name: str, tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(f"strategy.name={name}", "eval.adapt_steps=[0, 1, 5]", *EXTRA.get(name, ()))
    predictors = labels(cfg)
    assert titles(cfg) == {label: old_display_name(label, predictors) for label in predictors}


def test_the_default_runs_table_shows_the_same_names(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config()
    predictors = labels(cfg)
    assert titles(cfg) == {"global": "global", "finetune": "fine-tuned", "knn": "kNN-Per"}
    stats = {"mean": 0.5, "weighted_mean": 0.5, "p10": 0.25, "clients": 3}
    summary = {"accuracy": {p: stats for p in predictors}, "predictors": predictors}
    console = Console(width=200, record=True)
    console.print(summary_table({**summary, "titles": titles(cfg)}))
    rows = [line.split()[0] for line in console.export_text().splitlines() if "50.0" in line]
    assert rows == ["global", "fine-tuned", "kNN-Per"]
    # a summary.json written before titles were recorded shows the labels themselves
    console.print(summary_table(summary))
    rows = [line.split()[0] for line in console.export_text().splitlines() if "50.0" in line]
    assert rows == ["global", "finetune", "knn"]
