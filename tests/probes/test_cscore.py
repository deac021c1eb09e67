"""C-score proxies: hold-out accuracy, kernel density in embedding space, learning speed."""

from __future__ import annotations

import numpy as np
import pytest

from fedmem.probes import (
    ProbeInputError,
    holdout_cscore,
    kernel_density_cscore,
    learning_speed,
    mean_pairwise_sq_distance,
)
from fedmem.probes import cscore as cscore_module

# Models 0-3; example 0 is OUT for models 2, 3 (correct 1, 0); example 1 OUT for 0, 1, 3 (1, 1, 0).
MEMBERSHIP = np.array([[True, False], [True, False], [False, True], [False, False]])
CORRECT = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])


def test_holdout_cscore_is_the_out_model_accuracy() -> None:
    est = holdout_cscore(MEMBERSHIP, CORRECT)
    np.testing.assert_allclose(est.value, [0.5, 2 / 3])
    # se = sqrt(var / n_out): var(1, 0) = 0.5 over 2; var(1, 1, 0) = 1/3 over 3.
    np.testing.assert_allclose(est.stderr, [0.5, 1 / 3])
    np.testing.assert_allclose(est.ratios, [3 / 8])
    np.testing.assert_allclose(est.per_ratio, [[0.5, 2 / 3]])


def test_holdout_cscore_averages_subset_ratios_with_equal_weight() -> None:
    membership = np.array([[False], [False], [False], [True], [False]])
    correct = np.array([[1.0], [0.0], [1.0], [0.0], [1.0]])
    ratios = np.array([0.2, 0.2, 0.8, 0.8, 0.8])
    est = holdout_cscore(membership, correct.astype(bool), subset_ratios=ratios)
    # Ratio 0.2: OUT models 0, 1 -> 0.5 (var 0.5, n 2). Ratio 0.8: OUT 2, 4 -> 1.0 (var 0, n 2).
    np.testing.assert_allclose(est.per_ratio, [[0.5], [1.0]])
    np.testing.assert_allclose(est.value, [0.75])
    np.testing.assert_allclose(est.stderr, [np.sqrt(0.5 / 2 + 0.0) / 2])
    np.testing.assert_allclose(est.ratios, [0.2, 0.8])


def test_holdout_cscore_errors() -> None:
    with pytest.raises(ProbeInputError, match=r"example\(s\) 0 are never OUT at subset ratio 0.5"):
        holdout_cscore(np.array([[True], [False]]), np.ones((2, 1)), subset_ratios=np.array([0.5, 0.9]))
    with pytest.raises(ProbeInputError, match=r"correctness must lie in \[0, 1\]"):
        holdout_cscore(MEMBERSHIP, CORRECT * 2)
    with pytest.raises(ProbeInputError, match="subset_ratios has 3 entries"):
        holdout_cscore(MEMBERSHIP, CORRECT, subset_ratios=np.ones(3))
    with pytest.raises(ProbeInputError, match="correctness has shape"):
        holdout_cscore(MEMBERSHIP, CORRECT[:, :1])
    single_out = holdout_cscore(np.array([[True], [False]]), np.ones((2, 1)))
    assert single_out.stderr[0] == np.inf


def test_kernel_density_hand_values() -> None:
    x = np.array([[0.0], [1.0], [3.0]])
    y = np.array([0, 0, 1])
    e1, e4, e9 = np.exp(-1.0), np.exp(-4.0), np.exp(-9.0)
    diff = kernel_density_cscore(x, y, bandwidth=1.0)
    np.testing.assert_allclose(diff, [(e1 - e9) / 3, (e1 - e4) / 3, (-e9 - e4) / 3])
    ratio = kernel_density_cscore(x, y, bandwidth=1.0, variant="ratio")
    np.testing.assert_allclose(ratio, [e1 / (e1 + e9), e1 / (e1 + e4), 0.0])


def test_kernel_density_blocks_match_a_brute_force_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = np.random.default_rng(0)
    x = gen.normal(size=(37, 3))
    y = gen.integers(0, 3, size=37)
    h = 1.3
    k = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / h**2)
    np.fill_diagonal(k, 0.0)
    same = y[:, None] == y[None]
    monkeypatch.setattr(cscore_module, "_KERNEL_BLOCK", 8)
    np.testing.assert_allclose(
        kernel_density_cscore(x, y, bandwidth=h), (np.where(same, k, -k)).sum(1) / 37, atol=1e-12
    )
    np.testing.assert_allclose(
        kernel_density_cscore(x, y, bandwidth=h, variant="ratio"), (same * k).sum(1) / k.sum(1), atol=1e-12
    )


def test_kernel_density_ratio_survives_far_apart_points() -> None:
    x = np.array([[0.0], [1000.0], [1001.0]])
    got = kernel_density_cscore(x, np.array([0, 0, 1]), bandwidth=1.0, variant="ratio")
    np.testing.assert_allclose(got, [1.0, 0.0, 0.0])
    np.testing.assert_allclose(kernel_density_cscore(x, np.array([0, 0, 1]), bandwidth=1.0)[0], 0.0)


def test_default_bandwidth_is_the_mean_pairwise_squared_distance() -> None:
    gen = np.random.default_rng(1)
    x = gen.normal(5.0, 2.0, size=(50, 4))
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert mean_pairwise_sq_distance(x) == pytest.approx(d2.sum() / (50 * 49))
    y = gen.integers(0, 2, size=50)
    np.testing.assert_allclose(
        kernel_density_cscore(x, y), kernel_density_cscore(x, y, bandwidth=np.sqrt(d2.sum() / (50 * 49)))
    )


def test_kernel_density_ranks_a_mislabelled_point_last() -> None:
    gen = np.random.default_rng(2)
    x = np.concatenate([gen.normal(0.0, 1.0, (40, 2)), gen.normal(8.0, 1.0, (40, 2))])
    y = np.repeat([0, 1], 40)
    y[3] = 1  # a class-1 label inside the class-0 cluster
    for variant in ("difference", "ratio"):
        assert np.argmin(kernel_density_cscore(x, y, bandwidth=2.0, variant=variant)) == 3


def test_kernel_density_errors() -> None:
    x = np.zeros((3, 2))
    with pytest.raises(ProbeInputError, match="bandwidth must be positive"):
        kernel_density_cscore(x, np.array([0, 1, 0]))
    with pytest.raises(ProbeInputError, match="labels must be a 1-D integer array of length 3"):
        kernel_density_cscore(x, np.array([0, 1]))
    with pytest.raises(ProbeInputError, match="variant"):
        kernel_density_cscore(x + np.eye(3, 2), np.array([0, 1, 0]), variant="knn")  # type: ignore[arg-type]
    with pytest.raises(ProbeInputError, match="at least 2"):
        mean_pairwise_sq_distance(np.zeros((1, 2)))


def test_learning_speed_is_cumulative_training_accuracy() -> None:
    correct = np.array([[0, 1, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=bool)  # (epochs, examples)
    np.testing.assert_allclose(learning_speed(correct), [0.5, 0.75, 1.0])
    np.testing.assert_allclose(learning_speed(np.array([[0.2, 0.9], [0.4, 1.0]])), [0.3, 0.95])
    with pytest.raises(ProbeInputError, match="no epochs"):
        learning_speed(np.zeros((0, 3)))
    with pytest.raises(ProbeInputError, match=r"training_correctness must lie in \[0, 1\]"):
        learning_speed(np.array([[2.0]]))
