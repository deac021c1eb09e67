"""``eval.adapt_steps``: predictors that adapt by local steps, reported after each step count."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedmem.client import labels, titles
from fedmem.config import Config
from fedmem.errors import ConfigError
from fedmem.federation.sessions import run_on_engine
from fedmem.reports.runs import adaptation_curves, plot_lines, render


def test_an_adaptation_curve_from_one_federation(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(
        "strategy.name=perfedavg",
        "strategy.perfedavg.adapt_steps=2",
        "eval.adapt_steps=[0, 2, 4]",
        "runtime.engine=inprocess",
    )
    assert labels(cfg) == [
        "global",
        "perfedavg",
        "perfedavg@0",
        "perfedavg@2",
        "perfedavg@4",
        "finetune",
        "finetune@0",
        "finetune@2",
        "finetune@4",
        "knn",
    ]
    run = run_on_engine(cfg)
    clients = run.metrics()[-1]["clients"]
    assert len(clients) == 4  # seen and unseen alike
    for m in clients.values():
        # 0 steps is the meta-model as is; adapt_steps steps is the strategy's own predictor, exactly
        assert m["acc/perfedavg@0"] == m["acc/global"] == m["acc/finetune@0"]
        assert m["acc/perfedavg@2"] == m["acc/perfedavg"]
    summary = run.summary()
    assert set(summary["unseen_accuracy"]) == set(labels(cfg))
    curve = [summary["accuracy"][f"perfedavg@{k}"]["mean"] for k in (0, 2, 4)]
    assert curve[0] < curve[2]  # a tiny federation's meta-model gains from adapting to each client
    # the curve's points are in the tables, not in the per-round figures
    results, pngs = render(run.path)
    assert pngs and all("@" not in label for _, label in plot_lines(results, single=True).values())
    # ... and in their own figure: one line per adapting predictor and client group, one seed
    assert run.path / "adaptation.png" in pngs
    curves = adaptation_curves(results, one=True)
    assert sorted(curves) == [
        "Per-FedAvg + fine-tuned, seen clients",
        "Per-FedAvg + fine-tuned, unseen clients",
        "Per-FedAvg, seen clients",
        "Per-FedAvg, unseen clients",
    ]
    assert curves["Per-FedAvg, seen clients"] == [list(zip((0, 2, 4), curve, strict=True))]


def test_strategies_that_do_not_adapt_by_steps_add_no_labels(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config("strategy.name=ditto", "eval.adapt_steps=[1]", "eval.personalizers=['knnper']")
    assert labels(cfg) == ["global", "ditto", "knn"]


def test_adapt_steps_are_counts() -> None:
    from fedmem.config import load_config

    with pytest.raises(ConfigError, match=r"eval\.adapt_steps must hold values >= 0, got \[1, -2\]"):
        load_config("default", ["eval.adapt_steps=[1, -2]"])


def test_display_names_of_the_curve(tiny_config: Callable[..., Config]) -> None:
    # the titles the engine records in summary.json, which every table and figure shows
    shown = titles(tiny_config("strategy.name=perfedavg", "eval.adapt_steps=[1, 5]"))
    assert shown["perfedavg@1"] == "Per-FedAvg, 1 step"
    assert shown["finetune@5"] == "Per-FedAvg + fine-tuned, 5 steps"
    assert shown["finetune"] == "Per-FedAvg + fine-tuned"
