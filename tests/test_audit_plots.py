"""The audit's figures: PNGs that decode and show every series, and their input checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedmem.reports.leakage_figures import (
    _ranked,
    counterfactual_ranking,
    exposure_vs_repetitions,
    privacy_vs_gain,
    roc_curves,
)
from tests.test_plots import _check_png


def test_roc_curves_draw_log_log_and_drop_points_at_zero(tmp_path: Path) -> None:
    fpr = np.array([0.0, 0.0, 0.001, 0.01, 0.1, 1.0])
    curves = {
        "global": (fpr, np.array([0.0, 0.002, 0.003, 0.02, 0.15, 1.0]), 0.55),
        "knn": (fpr, np.array([0.0, 0.01, 0.05, 0.2, 0.6, 1.0]), 0.8),
    }
    _check_png(roc_curves(curves, tmp_path / "roc.png"), 2)
    with pytest.raises(ValueError, match="no point with positive FPR and TPR"):
        roc_curves({"x": ([0.0, 0.0], [0.0, 1.0], 0.5)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="different lengths"):
        roc_curves({"x": ([0.1, 1.0], [1.0], 0.5)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="curves is empty"):
        roc_curves({}, tmp_path / "bad.png")


def test_exposure_vs_repetitions(tmp_path: Path) -> None:
    series = {
        "global": ([1, 4, 16], [1.5, 2.0, 4.0], [0.2, 0.3, 0.5]),
        "knn": ([1, 4, 16], [2.0, 5.0, 9.0], [0.1, 0.4, 0.3]),
    }
    path = exposure_vs_repetitions(
        series, tmp_path / "exp.png", null=1 / math.log(2), max_exposure=math.log2(1000)
    )
    _check_png(path, 2, size_in=None)  # the legend sits below the axes: the figure grows with it
    with pytest.raises(ValueError, match="different lengths"):
        exposure_vs_repetitions({"g": ([1, 4], [1.0], [0.1])}, tmp_path / "bad.png", null=1.44)


def test_privacy_vs_gain_wants_fractions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = {
        "global": (np.zeros(16), 0.5 + rng.normal(0, 0.01, 16)),
        "finetune": (rng.uniform(0, 0.1, 16), 0.52 + rng.normal(0, 0.01, 16)),
    }
    _check_png(privacy_vs_gain(points, tmp_path / "pg.png"), 2)
    with pytest.raises(ValueError, match="pass accuracy fractions"):
        privacy_vs_gain({"x": ([12.0], [0.5])}, tmp_path / "bad.png")


def test_counterfactual_ranking_orders_clients(tmp_path: Path) -> None:
    mem = np.array([0.01, 0.05, -0.01, 0.05])
    assert _ranked(mem).tolist() == [1, 3, 0, 2]  # descending, ties in the given order
    path = counterfactual_ranking(
        [3, 7, 9, 12], mem, [0.01, math.inf, 0.02, 0.01], tmp_path / "cf.png", sizes=[100, 200, 300, 400]
    )
    _check_png(path, 1)
    with pytest.raises(ValueError, match="one entry per client"):
        counterfactual_ranking([1, 2], [0.1], [0.1], tmp_path / "bad.png")
