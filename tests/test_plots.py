"""The figures: the numbers behind them by hand, and PNGs that decode, have the right shape and show data."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from fedmem.reports.figures import DPI, PALETTE
from fedmem.reports.run_figures import (
    accuracy_vs_round,
    client_accuracy_ecdf,
    gain_vs_entropy,
    knn_lambda_across_clients,
    mean_std_over_seeds,
)

# benchmarks/dp_curve.py draws its figure itself; a script, it finds its directory on sys.path
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dp_curve import metric_panels, setting_points


def _check_png(path: Path, n_series: int, size_in: tuple[float, float] | None = (6.4, 4.2)) -> np.ndarray:
    """Assert the PNG decodes, is landscape, is not blank, and shows the first series' colours."""
    assert path.is_file()
    img = imread(path)
    rgb = img[..., :3].astype(np.float64)
    height, width = rgb.shape[:2]
    assert width > height
    if size_in is not None:
        assert (height, width) == (round(size_in[1] * DPI), round(size_in[0] * DPI))
    assert rgb.std() > 0.05
    # The data are drawn: each series' palette colour appears on some pixels, opaque or translucent
    # over white (a pixel a·c + (1 - a)·white has 1 - pixel = a·(1 - c)).
    ink = 1 - rgb.reshape(-1, 3)
    ink = ink[ink.max(axis=1) > 0.02]  # white pixels cannot match; skipping them keeps this fast
    for colour in PALETTE[:n_series]:
        d = 1 - np.array(to_rgb(colour))
        a = ink @ d / (d @ d)
        close = (np.abs(ink - a[:, None] * d).max(axis=1) < 0.03) & (a > 0.5)
        assert close.sum() >= 20, f"colour {colour} is (almost) absent"
    # And beyond white, black and greys there are several distinct colours.
    quantized = np.round((1 - ink) * 255).astype(np.int64)
    chromatic = quantized[quantized.max(axis=1) - quantized.min(axis=1) > 40]
    assert len(np.unique(chromatic @ np.array([1 << 16, 1 << 8, 1]))) >= 3
    return rgb


def test_mean_std_over_seeds_by_hand() -> None:
    runs = [[(1, 0.5), (2, 0.6), (3, 0.7)], [(1, 0.7), (3, 0.9)]]
    rounds, mean, std = mean_std_over_seeds(runs)
    assert rounds == [1, 3]
    assert mean == pytest.approx([0.6, 0.8])
    assert std == pytest.approx([0.1, 0.1])  # population std of {a, b} is |a - b| / 2


def test_mean_std_over_seeds_drops_nan_orders_rounds_and_handles_one_seed() -> None:
    # Round 2 has a NaN in the second seed, so it is not common; input order does not matter.
    runs = [[(3, 0.2), (1, 0.4), (2, 0.1)], [(2, math.nan), (1, 0.8), (3, 0.2)], [(1, 0.6), (3, 0.5)]]
    rounds, mean, std = mean_std_over_seeds(runs)
    assert rounds == [1, 3]
    assert mean == pytest.approx([0.6, 0.3])
    assert std == pytest.approx([math.sqrt(0.08 / 3), math.sqrt(0.06 / 3)])
    assert mean_std_over_seeds([[(5, 0.25)]]) == ([5], [0.25], [0.0])
    assert mean_std_over_seeds([[(1, 0.5)], [(2, 0.5)]]) == ([], [], [])
    with pytest.raises(ValueError, match="runs is empty"):
        mean_std_over_seeds([])
    with pytest.raises(ValueError, match="round 1 twice"):
        mean_std_over_seeds([[(1, 0.5), (1, 0.6)]])


def _curves(
    n_rounds: int, n_seeds: int, level: float, rng: np.random.Generator
) -> list[list[tuple[int, float]]]:
    base = level * (1 - np.exp(-np.arange(1, n_rounds + 1) / 4))
    return [
        [(r + 1, float(np.clip(a + rng.normal(0, 0.02), 0, 1))) for r, a in enumerate(base)]
        for _ in range(n_seeds)
    ]


def test_accuracy_vs_round_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    series = {
        "FedAvg · global": _curves(12, 3, 0.7, rng),
        "FedAvg · kNN-Per": _curves(12, 3, 0.85, rng),
        "local only": _curves(12, 3, 0.6, rng),
    }
    out = accuracy_vs_round(series, tmp_path / "sub" / "acc.png", title="Fashion-MNIST, Dirichlet α = 0.3")
    assert out == tmp_path / "sub" / "acc.png"
    _check_png(out, 3)
    # A single seed with a NaN round still draws (no band).
    one = {"FedAvg": [[(1, 0.3), (2, math.nan), (3, 0.5)]]}
    _check_png(accuracy_vs_round(one, tmp_path / "one.png", title="one seed"), 1)


def test_accuracy_vs_round_many_lines_put_the_legend_below_on_a_wider_figure(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    series = {f"strategy {i} · kNN-Per": _curves(8, 2, 0.5 + 0.05 * i, rng) for i in range(8)}
    rgb = _check_png(accuracy_vs_round(series, tmp_path / "many.png", title="8 lines"), 8, size_in=None)
    height, width = rgb.shape[:2]
    assert width > round(6.4 * DPI)  # wider than the default figure
    assert height > round(4.2 * DPI)  # and taller, for the legend rows


def test_accuracy_vs_round_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="series is empty"):
        accuracy_vs_round({}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="no seeds"):
        accuracy_vs_round({"a": []}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="no round that every seed"):
        accuracy_vs_round({"a": [[(1, 0.5)], [(2, 0.5)]]}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="fractions, not percent"):
        accuracy_vs_round({"a": [[(1, 81.0)]]}, tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()


def test_client_accuracy_ecdf_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    acc = {
        "global": list(rng.beta(8, 4, 60)),
        "fine-tuned": list(rng.beta(10, 3, 60)),
        "kNN-Per": [*rng.beta(14, 2, 59), math.nan],  # an unevaluated client is dropped
    }
    _check_png(client_accuracy_ecdf(acc, tmp_path / "ecdf.png", title="per-client accuracy"), 3)
    _check_png(client_accuracy_ecdf({"solo": [0.8]}, tmp_path / "solo.png", title="one client"), 1)
    with pytest.raises(ValueError, match="accuracies is empty"):
        client_accuracy_ecdf({}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match=r"accuracies\['a'\] is empty"):
        client_accuracy_ecdf({"a": []}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="only NaN"):
        client_accuracy_ecdf({"a": [math.nan]}, tmp_path / "x.png", title="t")


def test_gain_vs_entropy_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ent = rng.uniform(0.5, 3.3, 40)
    points = {
        "fine-tuned": (list(ent), list(0.15 - 0.04 * ent + rng.normal(0, 0.02, 40))),
        "kNN-Per": (list(ent), list(0.25 - 0.06 * ent + rng.normal(0, 0.02, 40))),
        "two clients": ([1.0, 2.0], [0.05, math.nan]),  # no trend line; the NaN pair is dropped
    }
    _check_png(gain_vs_entropy(points, tmp_path / "gain.png", title="gain vs. entropy"), 3)


def test_gain_vs_entropy_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="points is empty"):
        gain_vs_entropy({}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="3 entropies but 2 gains"):
        gain_vs_entropy({"kNN-Per": ([1.0, 2.0, 3.0], [0.1, 0.2])}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="not points"):
        gain_vs_entropy({"kNN-Per": ([1.0], [12.0])}, tmp_path / "x.png", title="t")


def test_knn_lambda_across_clients_bars_and_strip(tmp_path: Path) -> None:
    grid = [i / 10 for i in range(11)]
    rng = np.random.default_rng(5)
    lambdas = {
        "FedAvg": [0.1 * k for k in rng.integers(3, 11, 40)],  # 0.1 * 3 is not exactly 0.3
        "FedProx": [0.1 * k for k in rng.integers(0, 8, 40)],
        "IFCA": [*(0.1 * k for k in rng.integers(0, 11, 39)), math.nan],
    }
    _check_png(knn_lambda_across_clients(lambdas, tmp_path / "bars.png", title="λ", grid=grid), 3)
    # The strip plot's legend always goes below the axes (no corner is free), on a wider figure.
    strip = _check_png(knn_lambda_across_clients(lambdas, tmp_path / "strip.png", title="λ"), 3, size_in=None)
    assert strip.shape[1] > round(6.4 * DPI)
    _check_png(knn_lambda_across_clients({"one": [0.5]}, tmp_path / "one.png", title="λ", grid=grid), 1)
    with pytest.raises(ValueError, match="lambdas is empty"):
        knn_lambda_across_clients({}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="not on the grid"):
        knn_lambda_across_clients({"a": [0.35]}, tmp_path / "x.png", title="t", grid=grid)
    with pytest.raises(ValueError, match="grid is empty"):
        knn_lambda_across_clients({"a": [0.3]}, tmp_path / "x.png", title="t", grid=[])


def test_strip_plot_is_reproducible(tmp_path: Path) -> None:
    lambdas = {"a": [0.2, 0.4, 0.4, 0.9], "b": [0.0, 1.0]}
    first = knn_lambda_across_clients(lambdas, tmp_path / "1.png", title="t")
    second = knn_lambda_across_clients(lambdas, tmp_path / "2.png", title="t")
    np.testing.assert_array_equal(imread(first), imread(second))


def test_setting_points_by_hand() -> None:
    xs, mean, std = setting_points([[80.0, 82.0], [70.0, float("nan")], [], [float("nan")], [1.0, 2.0, 3.0]])
    assert xs == [0, 1, 4]
    assert mean.tolist() == [81.0, 70.0, 2.0]
    assert std.tolist() == [1.0, 0.0, math.sqrt(2 / 3)]


def test_metric_panels_png(tmp_path: Path) -> None:
    settings = ["ref.\nε none", "0.1\nε 900", "1\nε 40"]
    acc = {"global": [[80.0, 82.0], [70.0], []], "kNN-Per": [[90.0], [88.0, float("nan")], [85.0]]}
    auc = {"global": [[0.6], [0.55], [0.5]], "kNN-Per": [[0.62], [0.6], [0.58]]}
    path = metric_panels(
        settings, [("acc", acc, None), ("auc", auc, 0.5)], tmp_path / "m.png", title="t", xlabel="z"
    )
    _check_png(path, 2, size_in=None)


def test_metric_panels_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="settings is empty"):
        metric_panels([], [("a", {"x": []}, None)], tmp_path / "b.png", title="t", xlabel="z")
    with pytest.raises(ValueError, match="has 1 settings, expected 2"):
        metric_panels(["a", "b"], [("acc", {"x": [[1.0]]}, None)], tmp_path / "b.png", title="t", xlabel="z")
    with pytest.raises(ValueError, match="nothing to draw"):
        metric_panels(
            ["a"], [("acc", {"x": [[float("nan")]]}, None)], tmp_path / "b.png", title="t", xlabel="z"
        )
    assert not (tmp_path / "b.png").exists()
