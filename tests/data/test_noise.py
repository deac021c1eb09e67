"""Label flipping as a pure function: seeded, exact counts, always another class, uniform over the others."""

from __future__ import annotations

import numpy as np
import pytest

from fedmem.data.noise import flip_labels, noisy_clients


def _labels(n: int = 200, k: int = 10, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, n)


def test_same_seed_same_flips_other_seed_or_client_other_flips() -> None:
    y = _labels()
    a, b = flip_labels(0, 3, y, 0.4, 10), flip_labels(0, 3, y, 0.4, 10)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.labels, b.labels)
    for other in (flip_labels(1, 3, y, 0.4, 10), flip_labels(0, 4, y, 0.4, 10)):
        assert not np.array_equal(other.mask, a.mask)


@pytest.mark.parametrize(
    ("n", "fraction", "count"), [(200, 0.4, 80), (5, 0.5, 2), (7, 0.5, 4), (3, 0.1, 0), (9, 1.0, 9)]
)
def test_exactly_round_fraction_times_n_are_flipped(n: int, fraction: float, count: int) -> None:
    y = _labels(n)
    flips = flip_labels(0, 0, y, fraction, 10)
    assert count == round(fraction * n) and flips.count == count
    assert int((flips.labels != y).sum()) == count  # a flipped label never equals its original
    assert np.array_equal(flips.labels[~flips.mask], y[~flips.mask])
    assert np.array_equal(flips.original, y) and flips.labels.dtype == np.int64
    assert flips.labels.min() >= 0 and flips.labels.max() < 10


def test_zero_fraction_changes_nothing_and_the_input_is_not_modified() -> None:
    y = _labels()
    kept = y.copy()
    flips = flip_labels(0, 0, y, 0.0, 10)
    assert flips.count == 0 and np.array_equal(flips.labels, y)
    flip_labels(0, 0, y, 1.0, 10)
    assert np.array_equal(y, kept)


def test_new_labels_are_uniform_over_the_other_classes() -> None:
    y = np.zeros(9000, np.int64)
    flips = flip_labels(0, 0, y, 1.0, 4)
    counts = np.bincount(flips.labels, minlength=4)
    assert counts[0] == 0
    # 3,000 expected per class, standard deviation about 45: 6 sigma either way
    assert np.all(np.abs(counts[1:] - 3000) < 270), counts


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one class label per example"):
        flip_labels(0, 0, np.zeros((3, 2), np.int64), 0.5, 4)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        flip_labels(0, 0, np.zeros(3, np.int64), 1.5, 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        flip_labels(0, 0, np.zeros(3, np.int64), 0.5, 1)


def test_noisy_clients_default_to_every_seen_client() -> None:
    assert noisy_clients((), (0, 2, 3)) == (0, 2, 3)
    assert noisy_clients((3, 1), (0, 2, 3)) == (1, 3)
