"""Counterfactual memorization and influence: hand values, 1-NN oracles, mislabelled points, clients."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from fedmem.probes import (
    ProbeInputError,
    client_influence,
    client_memorization,
    counterfactual_influence,
    counterfactual_memorization,
    example_membership,
)
from fedmem.probes import counterfactual as counterfactual_module

# Example 0: IN for models 0, 1 (scores 1, 1), OUT for 2, 3 (scores 0, 1).
# Example 1: IN for models 1, 2 (scores 1, 1), OUT for 0, 3 (scores 0, 0).
HAND_MEMBERSHIP = np.array([[True, False], [True, True], [False, True], [False, False]])
HAND_SCORES = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])


def test_hand_values_and_welch_standard_errors() -> None:
    est = counterfactual_memorization(HAND_MEMBERSHIP, HAND_SCORES)
    np.testing.assert_allclose(est.value, [0.5, 1.0])
    # Example 0: var_in = 0, var_out = var(0, 1; ddof 1) = 0.5 -> se = sqrt(0.5 / 2) = 0.5.
    np.testing.assert_allclose(est.stderr, [0.5, 0.0])
    np.testing.assert_array_equal(est.n_in, [2, 2])
    np.testing.assert_array_equal(est.n_out, [2, 2])


def test_standard_error_is_inf_with_a_single_model_on_one_side() -> None:
    membership = np.array([[True], [False], [False]])
    est = counterfactual_memorization(membership, np.array([[1.0], [0.0], [1.0]]))
    assert est.value[0] == pytest.approx(0.5)
    assert est.stderr[0] == np.inf


def test_a_constant_classifier_memorizes_nothing() -> None:
    gen = np.random.default_rng(0)
    membership = gen.random((16, 50)) < 0.5
    membership[0], membership[1] = True, False
    est = counterfactual_memorization(membership, np.ones((16, 50)))
    np.testing.assert_array_equal(est.value, np.zeros(50))
    np.testing.assert_array_equal(est.stderr, np.zeros(50))


def _one_nn_correctness(
    x: NDArray[np.float64], y: NDArray[np.int64], membership: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """Correctness (models x points) of 1-nearest-neighbour classifiers fit on each model's IN points."""
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # (n, n)
    masked = np.where(membership[:, None, :], d2[None], np.inf)  # (M, n, n): only IN points vote
    nearest = masked.argmin(axis=2)  # (M, n); an IN point is its own neighbour at distance 0
    return (y[nearest] == y[None, :]).astype(np.float64)


def _half_subsets(gen: np.random.Generator, n_models: int, n: int) -> NDArray[np.bool_]:
    return np.argsort(gen.random((n_models, n)), axis=1) < n // 2


def test_one_nn_on_random_labels_memorizes_one_minus_one_over_k() -> None:
    # IN, 1-NN returns the point's own label (1); OUT, a random neighbour's label matches w.p. 1/K.
    gen = np.random.default_rng(1)
    n, k = 400, 4
    x = gen.normal(size=(n, 5))
    y = gen.integers(0, k, size=n)
    membership = _half_subsets(gen, 64, n)
    est = counterfactual_memorization(membership, _one_nn_correctness(x, y, membership))
    # Per-example se ~ sqrt(0.1875 / 32) ~ 0.077; over 400 examples the mean has sd ~ 0.004-0.01.
    assert est.value.mean() == pytest.approx(1 - 1 / k, abs=0.03)
    assert np.all(est.stderr < 0.12)


def test_mislabelled_examples_score_far_above_clean_ones() -> None:
    # Three well-separated Gaussian classes (150 points, Iris-sized); 15 labels flipped.
    gen = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [3.0, 5.0]])
    y_true = np.repeat(np.arange(3), 50)
    x = centres[y_true] + gen.normal(size=(150, 2))
    flipped = gen.choice(150, size=15, replace=False)
    y = y_true.copy()
    y[flipped] = (y_true[flipped] + gen.integers(1, 3, size=15)) % 3
    membership = _half_subsets(gen, 48, 150)
    mem = counterfactual_memorization(membership, _one_nn_correctness(x, y, membership)).value
    is_flipped = np.isin(np.arange(150), flipped)
    assert mem[is_flipped].mean() > 0.8
    assert mem[~is_flipped].mean() < 0.2
    assert np.isin(np.argsort(-mem)[:15], flipped).sum() >= 13


def test_influence_diagonal_is_memorization_and_matches_a_loop_oracle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = np.random.default_rng(3)
    membership = gen.random((12, 9)) < 0.5
    membership[:2] = [[True] * 9, [False] * 9]
    scores = gen.normal(10.0, 1.0, size=(12, 9))  # offset 10 exercises the centring
    monkeypatch.setattr(counterfactual_module, "_INFLUENCE_BLOCK", 4)  # several blocks
    infl = counterfactual_influence(membership, scores)
    mem = counterfactual_memorization(membership, scores)
    np.testing.assert_allclose(np.diag(infl.value), mem.value, atol=1e-12)
    np.testing.assert_allclose(np.diag(infl.stderr), mem.stderr, atol=1e-12)
    for i in range(9):
        for j in range(9):
            a, b = scores[membership[:, i], j], scores[~membership[:, i], j]
            assert infl.value[i, j] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
            se = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
            assert infl.stderr[i, j] == pytest.approx(se, abs=1e-10)


def test_influence_on_a_subset_of_rows_and_test_columns() -> None:
    gen = np.random.default_rng(4)
    membership = gen.random((20, 30)) < 0.5
    membership[:2] = [[True] * 30, [False] * 30]
    test_scores = gen.random((20, 7))
    full = counterfactual_influence(membership, test_scores)
    part = counterfactual_influence(membership, test_scores, train_indices=np.array([5, 0, 29]))
    assert part.value.shape == (3, 7)
    np.testing.assert_allclose(part.value, full.value[[5, 0, 29]])
    np.testing.assert_array_equal(part.n_in, full.n_in[[5, 0, 29]])


def test_never_in_and_never_out_are_errors_naming_the_examples() -> None:
    membership = np.array([[True, False, True], [True, False, False]])
    with pytest.raises(ProbeInputError, match=r"example\(s\) 1 are never IN"):
        counterfactual_memorization(membership, np.zeros((2, 3)))
    membership[:, 1] = [True, False]
    with pytest.raises(ProbeInputError, match=r"example\(s\) 0 are never OUT"):
        counterfactual_memorization(membership, np.zeros((2, 3)))
    # A subset of rows reports original indices.
    with pytest.raises(ProbeInputError, match=r"example\(s\) 0 are never OUT"):
        counterfactual_influence(membership, np.zeros((2, 4)), train_indices=np.array([2, 0]))


def test_bad_shapes_and_values_are_refused() -> None:
    with pytest.raises(ProbeInputError, match="scores has shape"):
        counterfactual_memorization(HAND_MEMBERSHIP, HAND_SCORES[:3])
    with pytest.raises(ProbeInputError, match="scores contains NaN"):
        counterfactual_memorization(HAND_MEMBERSHIP, np.where(HAND_SCORES > 0, np.nan, 0.0))
    with pytest.raises(ProbeInputError, match="membership must have dtype bool"):
        counterfactual_memorization(HAND_MEMBERSHIP.astype(int), HAND_SCORES)
    with pytest.raises(ProbeInputError, match="3 models"):
        counterfactual_influence(HAND_MEMBERSHIP, HAND_SCORES[:3])
    with pytest.raises(ProbeInputError, match="indices"):
        counterfactual_influence(HAND_MEMBERSHIP, HAND_SCORES, train_indices=np.array([2]))


def test_client_granularity_uses_the_same_estimator() -> None:
    est = client_memorization(HAND_MEMBERSHIP, HAND_SCORES)
    np.testing.assert_allclose(est.value, [0.5, 1.0])
    infl = client_influence(HAND_MEMBERSHIP, HAND_SCORES, client_indices=np.array([1]))
    np.testing.assert_allclose(infl.value, [[-0.5, 1.0]])  # client 1 IN: (1, 0) -> 0.5; OUT: (1, 1) -> 1
    with pytest.raises(ProbeInputError, match=r"participation: client\(s\) 1 are never IN"):
        client_memorization(np.array([[True, False], [False, False]]), np.zeros((2, 2)))


def test_example_membership_follows_the_owning_client() -> None:
    participation = np.array([[True, False, True], [False, True, False]])
    got = example_membership(participation, np.array([2, 2, 0, 1]))
    np.testing.assert_array_equal(got, [[True, True, True, False], [False, False, False, True]])
    with pytest.raises(ProbeInputError, match=r"\[0, 3\)"):
        example_membership(participation, np.array([3]))
