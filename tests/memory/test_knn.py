"""Tests of the pure kNN-Per numerics: hand-computed cases, oracles and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from fedmem.memory import knn
from fedmem.memory.datastore import Datastore
from fedmem.memory.knn import (
    Selection,
    accuracy_grid,
    interpolate,
    knn_probabilities,
    select_lambda_k,
)

LN2 = math.log(2.0)
FAISS_MISSING = 3.4028235e38  # what FAISS puts at a missing neighbour's distance


# ---------------------------------------------------------------- knn_probabilities


def test_hand_computed_two_rows() -> None:
    T = 2.0
    # Row 0: weights 1, 1/2, 1/4 for labels 0, 1, 1 -> p = (1, 3/4) / (7/4) = (4/7, 3/7, 0).
    # Row 1: distances start at 5 (shift-invariant), weights 1, 1/2 for labels 2, 0; the
    #        third neighbour is missing -> p = (1/3, 0, 2/3).
    distances = np.array([[0.0, LN2 * T, 2 * LN2 * T], [5.0, 5.0 + LN2 * T, FAISS_MISSING]])
    labels = np.array([[0, 1, 1], [2, 0, -1]])
    p = knn_probabilities(distances, labels, num_classes=3, temperature=T)
    expected = np.array([[4 / 7, 3 / 7, 0.0], [1 / 3, 0.0, 2 / 3]])
    assert p.dtype == np.float64
    np.testing.assert_allclose(p, expected, rtol=1e-12, atol=1e-15)


def test_repeated_labels_accumulate() -> None:
    # Three neighbours of class 1 and one of class 0, all at the same distance -> (1/4, 3/4).
    p = knn_probabilities(np.zeros((1, 4)), np.array([[1, 0, 1, 1]]), num_classes=2, temperature=1.0)
    np.testing.assert_allclose(p, [[0.25, 0.75]], rtol=1e-15)


def test_missing_neighbours_get_zero_weight_wherever_they_sit() -> None:
    # A missing neighbour at distance 0 must neither vote nor set the shift: if it set the
    # row minimum, the valid weights exp(-1e6) would underflow to 0 and the row would be lost.
    distances = np.array([[0.0, 1e6, 1e6 + LN2], [0.0, 0.0, 0.0]])
    labels = np.array([[-1, 1, 0], [-1, 2, -1]])
    p = knn_probabilities(distances, labels, num_classes=3, temperature=1.0)
    np.testing.assert_allclose(p, [[1 / 3, 2 / 3, 0.0], [0.0, 0.0, 1.0]], rtol=1e-9)


def test_row_without_neighbours_is_uniform() -> None:
    distances = np.array([[FAISS_MISSING, np.inf], [0.0, 1.0]])
    labels = np.array([[-1, -1], [3, 3]])
    p = knn_probabilities(distances, labels, num_classes=4, temperature=1.0)
    np.testing.assert_array_equal(p[0], np.full(4, 0.25))
    np.testing.assert_array_equal(p[1], [0.0, 0.0, 0.0, 1.0])


def test_huge_distances_are_stable() -> None:
    T = 1.0
    distances = np.array([[1e6, 1e6 + LN2 * T], [1e6, 1e6]])
    labels = np.array([[0, 1], [1, 0]])
    p = knn_probabilities(distances, labels, num_classes=2, temperature=T)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, [[2 / 3, 1 / 3], [0.5, 0.5]], rtol=1e-6)


def test_tiny_temperature_is_one_nn_and_huge_is_a_vote() -> None:
    distances = np.array([[1.0, 2.0, 3.0]])
    labels = np.array([[2, 0, 0]])
    cold = knn_probabilities(distances, labels, num_classes=3, temperature=1e-300)
    np.testing.assert_array_equal(cold, [[0.0, 0.0, 1.0]])
    hot = knn_probabilities(distances, labels, num_classes=3, temperature=1e12)
    np.testing.assert_allclose(hot, [[2 / 3, 0.0, 1 / 3]], rtol=1e-9)


def test_float32_inputs_and_no_rows() -> None:
    p = knn_probabilities(
        np.array([[0.0, 1.0]], dtype=np.float32), np.array([[1, 0]], dtype=np.int32), 2, 1.0
    )
    near, far = 1.0, math.exp(-1.0)  # weights of the class-1 and the class-0 neighbour
    np.testing.assert_allclose(p, [[far / (near + far), near / (near + far)]], rtol=1e-7)
    assert knn_probabilities(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), 5, 1.0).shape == (0, 5)


@pytest.mark.parametrize(
    ("distances", "labels", "num_classes", "temperature", "match"),
    [
        (np.zeros((2, 3)), np.zeros((2, 2), dtype=int), 3, 1.0, "same shape"),
        (np.zeros(3), np.zeros(3, dtype=int), 3, 1.0, "same shape"),
        (np.zeros((1, 2)), np.array([[0, 3]]), 3, 1.0, r"\[-1, 2\]"),
        (np.zeros((1, 2)), np.array([[0, -2]]), 3, 1.0, r"\[-1, 2\]"),
        (np.zeros((1, 2)), np.array([[0.0, 1.0]]), 3, 1.0, "integers"),
        (np.array([[0.0, np.nan]]), np.array([[0, 1]]), 3, 1.0, "finite"),
        (np.zeros((1, 2)), np.array([[0, 1]]), 3, 0.0, "temperature"),
        (np.zeros((1, 2)), np.array([[0, 1]]), 3, -1.0, "temperature"),
        (np.zeros((1, 2)), np.array([[0, 0]]), 0, 1.0, "num_classes"),
    ],
)
def test_bad_inputs_raise(
    distances: NDArray[np.float64],
    labels: NDArray[np.int64],
    num_classes: int,
    temperature: float,
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        knn_probabilities(distances, labels, num_classes, temperature)


# ---------------------------------------------------------------- interpolate


def test_interpolate_exact_values() -> None:
    p_knn = np.array([[1.0, 0.0], [0.5, 0.5]])
    p_model = np.array([[0.0, 1.0], [0.25, 0.75]])
    np.testing.assert_array_equal(interpolate(p_knn, p_model, 0.25), [[0.25, 0.75], [0.3125, 0.6875]])
    # Per-sample lambda: row 0 uses 0.5, row 1 uses 1.0.
    np.testing.assert_array_equal(interpolate(p_knn, p_model, np.array([0.5, 1.0])), [[0.5, 0.5], [0.5, 0.5]])


def test_interpolate_endpoints_are_exact() -> None:
    gen = np.random.default_rng(0)
    p_knn = gen.dirichlet(np.ones(7), size=50)
    p_model = gen.dirichlet(np.ones(7), size=50)
    np.testing.assert_array_equal(interpolate(p_knn, p_model, 0.0), p_model)
    np.testing.assert_array_equal(interpolate(p_knn, p_model, 1.0), p_knn)
    np.testing.assert_array_equal(interpolate(p_knn, p_model, np.zeros(50)), p_model)
    np.testing.assert_array_equal(interpolate(p_knn, p_model, np.ones(50)), p_knn)


@pytest.mark.parametrize("lam", [-0.1, 1.5, np.array([0.5, 2.0]), np.array([0.5]), np.zeros((2, 1))])
def test_interpolate_rejects_bad_lambda(lam: float | NDArray[np.float64]) -> None:
    with pytest.raises(ValueError, match="lam"):
        interpolate(np.full((2, 2), 0.5), np.full((2, 2), 0.5), lam)


def test_interpolate_rejects_mismatch_and_nan() -> None:
    with pytest.raises(ValueError, match="same shape"):
        interpolate(np.ones((2, 2)), np.ones((2, 3)), 0.5)
    with pytest.raises(ValueError, match="finite"):
        interpolate(np.ones((1, 2)), np.array([[np.nan, 1.0]]), 0.5)


# ---------------------------------------------------------------- end to end with a datastore


def test_lambda_one_k_one_on_training_points_recovers_their_labels() -> None:
    gen = np.random.default_rng(1)
    n, d, C = 400, 16, 10
    x = gen.normal(size=(n, d))  # distinct with probability 1
    y = gen.integers(0, C, size=n)
    store = Datastore(x, y)
    distances, neighbor_labels = store.search(x, 1)
    p_knn = knn_probabilities(distances, neighbor_labels, C, temperature=1.0)
    p_model = gen.dirichlet(np.ones(C), size=n)  # an arbitrary model, ignored at lam = 1
    np.testing.assert_array_equal(interpolate(p_knn, p_model, 1.0).argmax(axis=1), y)
    sel = select_lambda_k(
        distances, neighbor_labels, p_model, y, num_classes=C, temperature=1.0, k_grid=[1], lambda_grid=[1.0]
    )
    assert sel.accuracy == 1.0


# ---------------------------------------------------------------- select_lambda_k


def _one_hot(labels: NDArray[np.int64], C: int) -> NDArray[np.float64]:
    return np.eye(C)[labels]


def test_select_prefers_knn_when_knn_right_and_model_wrong() -> None:
    # Truth is class 1; neighbours all say 1; the model is certain of class 0. At lam = 0.5
    # the two classes tie at 0.5 and argmax takes class 0, so only lam = 1 is right.
    n, C = 6, 3
    truth = np.ones(n, dtype=np.int64)
    distances = np.tile([0.0, 1.0, 2.0], (n, 1))
    neighbor_labels = np.ones((n, 3), dtype=np.int64)
    p_model = _one_hot(np.zeros(n, dtype=np.int64), C)
    sel = select_lambda_k(
        distances,
        neighbor_labels,
        p_model,
        truth,
        num_classes=C,
        temperature=1.0,
        k_grid=[1, 3],
        lambda_grid=[0.0, 0.5, 1.0],
    )
    assert isinstance(sel, Selection)
    assert (sel.lam, sel.k, sel.accuracy) == (1.0, 1, 1.0)
    np.testing.assert_array_equal(sel.grid, [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])


def test_select_prefers_model_when_model_right_and_knn_wrong() -> None:
    n, C = 5, 4
    truth = np.full(n, 2, dtype=np.int64)
    distances = np.zeros((n, 2))
    neighbor_labels = np.full((n, 2), 3, dtype=np.int64)
    p_model = _one_hot(truth, C)
    sel = select_lambda_k(
        distances,
        neighbor_labels,
        p_model,
        truth,
        num_classes=C,
        temperature=1.0,
        k_grid=[2, 1],
        lambda_grid=[1.0, 0.5, 0.0],
    )
    # lam = 0.5 ties classes 2 and 3; argmax takes 2 (the truth).
    np.testing.assert_array_equal(sel.grid, [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    assert (sel.lam, sel.k) == (0.5, 2)  # first maximum in row-major order


def test_select_chooses_k() -> None:
    # Nearest neighbour says the truth (0), the next two say 1, all equidistant: only k = 1
    # is right at lam = 1; the model is uniform, so any lam > 0 follows the kNN vote.
    n, C = 4, 2
    truth = np.zeros(n, dtype=np.int64)
    distances = np.zeros((n, 3))
    neighbor_labels = np.tile([0, 1, 1], (n, 1))
    p_model = np.full((n, C), 0.5)
    sel = select_lambda_k(
        distances,
        neighbor_labels,
        p_model,
        truth,
        num_classes=C,
        temperature=1.0,
        k_grid=[3, 1],
        lambda_grid=[0.5, 1.0],
    )
    assert sel.grid.shape == (2, 2)
    np.testing.assert_array_equal(sel.grid, [[0.0, 0.0], [1.0, 1.0]])
    assert (sel.k, sel.lam) == (1, 0.5)


def test_select_ties_go_to_first_in_row_major_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # Maxima at (0, 1) and (1, 0): row-major picks (0, 1), column-major would pick (1, 0).
    crafted = np.array([[0.2, 0.9, 0.1], [0.9, 0.3, 0.9]])
    monkeypatch.setattr(knn, "accuracy_grid", lambda *a, **kw: crafted)
    sel = knn.select_lambda_k(
        np.zeros((1, 1)),
        np.zeros((1, 1), dtype=np.int64),
        np.ones((1, 1)),
        np.zeros(1, dtype=np.int64),
        num_classes=1,
        temperature=1.0,
        k_grid=[7, 3],
        lambda_grid=[0.0, 0.4, 0.8],
    )
    assert (sel.k, sel.lam, sel.accuracy) == (7, 0.4, 0.9)


def test_select_all_tied_picks_first_pair() -> None:
    n, C = 3, 2
    truth = np.array([0, 1, 0])
    sel = select_lambda_k(
        np.zeros((n, 2)),
        truth[:, None].repeat(2, axis=1),
        _one_hot(truth, C),
        truth,
        num_classes=C,
        temperature=1.0,
        k_grid=[2, 1],
        lambda_grid=[0.7, 0.2],
    )
    assert (sel.k, sel.lam, sel.accuracy) == (2, 0.7, 1.0)


def test_accuracy_grid_matches_loop_over_interpolate() -> None:
    # Oracle for the vectorized lambda axis: one interpolate + argmax per pair.
    gen = np.random.default_rng(2)
    n, K, C = 300, 8, 5
    distances = np.sort(gen.exponential(size=(n, K)), axis=1)
    neighbor_labels = gen.integers(-1, C, size=(n, K))
    p_model = gen.dirichlet(np.ones(C), size=n)
    truth = gen.integers(0, C, size=n)
    k_grid, lambda_grid = [1, 3, 8], [0.0, 0.1, 0.35, 0.6, 0.9, 1.0]
    grid = accuracy_grid(
        distances,
        neighbor_labels,
        p_model,
        truth,
        num_classes=C,
        temperature=0.7,
        k_grid=k_grid,
        lambda_grid=lambda_grid,
    )
    expected = np.empty((3, 6))
    for i, k in enumerate(k_grid):
        p_knn = knn_probabilities(distances[:, :k], neighbor_labels[:, :k], C, 0.7)
        for j, lam in enumerate(lambda_grid):
            expected[i, j] = np.mean(interpolate(p_knn, p_model, lam).argmax(axis=1) == truth)
    np.testing.assert_array_equal(grid, expected)
    assert len(np.unique(grid)) > 3  # the case is not degenerate


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_grid": [4]}, "k_grid"),
        ({"k_grid": [0]}, "k_grid"),
        ({"k_grid": []}, "k_grid"),
        ({"lambda_grid": []}, "lambda_grid"),
        ({"lambda_grid": [1.2]}, "lam"),
    ],
)
def test_select_rejects_bad_grids(kwargs: dict[str, list[float]], match: str) -> None:
    args: dict[str, object] = {"k_grid": [1, 3], "lambda_grid": [0.0, 1.0]} | kwargs
    with pytest.raises(ValueError, match=match):
        select_lambda_k(
            np.zeros((2, 3)),
            np.zeros((2, 3), dtype=np.int64),
            np.full((2, 2), 0.5),
            np.zeros(2, dtype=np.int64),
            num_classes=2,
            temperature=1.0,
            **args,  # type: ignore[arg-type]
        )


def test_select_rejects_bad_model_and_labels() -> None:
    common = {"num_classes": 2, "temperature": 1.0, "k_grid": [1], "lambda_grid": [0.5]}
    d, y = np.zeros((2, 1)), np.zeros((2, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="p_model"):
        select_lambda_k(d, y, np.full((2, 3), 0.5), np.zeros(2, dtype=np.int64), **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        select_lambda_k(d, y, np.full((2, 2), 0.5), np.zeros(3, dtype=np.int64), **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zero samples"):
        select_lambda_k(d[:0], y[:0], np.zeros((0, 2)), np.zeros(0, dtype=np.int64), **common)  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties


@st.composite
def neighbour_sets(draw: st.DrawFn) -> tuple[NDArray[np.float64], NDArray[np.int64], int, float]:
    n = draw(st.integers(1, 8))
    k = draw(st.integers(1, 6))
    C = draw(st.integers(1, 5))
    dist = draw(hnp.arrays(np.float64, (n, k), elements=st.floats(0.0, 1e8, allow_subnormal=False)))
    labels = draw(hnp.arrays(np.int64, (n, k), elements=st.integers(-1, C - 1)))
    temperature = draw(st.floats(1e-3, 1e4))
    return np.sort(dist, axis=1), labels, C, temperature


@settings(max_examples=200, deadline=None)
@given(neighbour_sets())
def test_property_rows_are_distributions(
    case: tuple[NDArray[np.float64], NDArray[np.int64], int, float],
) -> None:
    distances, labels, C, T = case
    p = knn_probabilities(distances, labels, C, T)
    assert p.shape == (distances.shape[0], C)
    assert np.isfinite(p).all()
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    for row, lab in zip(p, labels, strict=True):
        present = lab[lab >= 0]
        if present.size:
            absent = np.setdiff1d(np.arange(C), present)
            assert (row[absent] == 0).all()  # no mass on classes no neighbour has
            assert row[present].max() > 0
        else:
            np.testing.assert_array_equal(row, np.full(C, 1.0 / C))


@settings(max_examples=100, deadline=None)
@given(neighbour_sets(), st.floats(0.0, 1e3))
def test_property_shift_invariance(
    case: tuple[NDArray[np.float64], NDArray[np.int64], int, float], shift: float
) -> None:
    distances, labels, C, T = case
    p = knn_probabilities(distances, labels, C, T)
    q = knn_probabilities(distances + shift, labels, C, T)
    # Adding the shift rounds distances near 1e8 by ~1e-8; divided by T >= 1e-3 that is a
    # relative error of ~1e-5 in a weight.
    np.testing.assert_allclose(q, p, rtol=1e-4, atol=1e-12)


@settings(max_examples=100, deadline=None)
@given(neighbour_sets(), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_property_interpolation_is_a_distribution(
    case: tuple[NDArray[np.float64], NDArray[np.int64], int, float], lam: float, seed: int
) -> None:
    distances, labels, C, T = case
    p_knn = knn_probabilities(distances, labels, C, T)
    p_model = np.random.default_rng(seed).dirichlet(np.ones(C), size=len(p_knn))
    p = interpolate(p_knn, p_model, lam)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
