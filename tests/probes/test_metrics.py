"""ROC, AUC, TPR at FPR and advantage: hand-built cases, ties, tiny samples, the null."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import ArrayLike
from scipy import stats

from fedmem.probes import (
    ProbeInputError,
    attack_metrics,
    auc,
    auc_null_std,
    membership_advantage,
    roc_curve,
    tpr_at_fpr,
)

# Sorted by score: 0.9 (member), 0.8 (member), 0.8 (non-member), 0.3 (non-member), 0.1 (member).
HAND_SCORES = np.array([0.1, 0.8, 0.3, 0.9, 0.8])
HAND_MEMBER = np.array([True, False, False, True, True])


def test_hand_built_roc_moves_ties_together() -> None:
    curve = roc_curve(HAND_SCORES, HAND_MEMBER)
    np.testing.assert_allclose(curve.fpr, [0, 0, 1 / 2, 1, 1])
    np.testing.assert_allclose(curve.tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(curve.thresholds, [np.inf, 0.9, 0.8, 0.3, 0.1])


def test_hand_built_auc_counts_the_tie_as_half() -> None:
    # Member-beats-non-member pairs: 0.9 > 0.8, 0.9 > 0.3, 0.8 = 0.8 (1/2), 0.8 > 0.3 -> 3.5 of 6.
    assert auc(HAND_SCORES, HAND_MEMBER) == pytest.approx(7 / 12, abs=1e-15)
    assert roc_curve(HAND_SCORES, HAND_MEMBER).auc == pytest.approx(7 / 12, abs=1e-15)


@pytest.mark.parametrize(
    ("max_fpr", "expected"), [(0.0, 1 / 3), (0.49, 1 / 3), (0.5, 2 / 3), (0.99, 2 / 3), (1.0, 1.0)]
)
def test_hand_built_tpr_at_fpr(max_fpr: float, expected: float) -> None:
    assert tpr_at_fpr(HAND_SCORES, HAND_MEMBER, max_fpr) == pytest.approx(expected)


def test_hand_built_advantage() -> None:
    assert membership_advantage(HAND_SCORES, HAND_MEMBER) == pytest.approx(1 / 3)


def test_auc_matches_mann_whitney_with_many_ties() -> None:
    gen = np.random.default_rng(0)
    scores = gen.integers(0, 6, size=300).astype(float)
    member = gen.random(300) < 0.4
    u = stats.mannwhitneyu(scores[member], scores[~member]).statistic
    expected = u / (member.sum() * (~member).sum())
    assert auc(scores, member) == pytest.approx(expected, abs=1e-12)
    assert roc_curve(scores, member).auc == pytest.approx(expected, abs=1e-12)


def test_identical_distributions_give_auc_half_within_its_standard_error() -> None:
    gen = np.random.default_rng(1)
    n1, n0 = 30_000, 20_000
    scores = gen.normal(size=n1 + n0)
    member = np.arange(n1 + n0) < n1
    assert auc(scores, member) == pytest.approx(0.5, abs=4 * auc_null_std(n1, n0))


def test_null_standard_error_matches_the_spread_over_repetitions() -> None:
    gen = np.random.default_rng(2)
    n1, n0 = 40, 60
    member = np.arange(n1 + n0) < n1
    aucs = [auc(gen.normal(size=n1 + n0), member) for _ in range(2000)]
    # The sd of a 2000-sample sd is about 1.6 % of it; 8 % is 5 of those.
    assert np.std(aucs, ddof=1) == pytest.approx(auc_null_std(n1, n0), rel=0.08)
    assert auc_null_std(1, 1) == pytest.approx(0.5)


def test_perfect_separation() -> None:
    scores = np.array([5.0, 6.0, 7.0, 1.0, 2.0])
    member = np.array([True, True, True, False, False])
    m = attack_metrics(scores, member, max_fprs=(0.0, 0.001))
    assert (m.auc, m.advantage) == (1.0, 1.0)
    assert m.tpr_at_fpr == {0.0: 1.0, 0.001: 1.0}
    assert (m.n_members, m.n_nonmembers) == (3, 2)
    # An inverted attack has AUC 0 and, by the absolute value, advantage 1.
    assert (auc(-scores, member), membership_advantage(-scores, member)) == (0.0, 1.0)
    assert tpr_at_fpr(-scores, member, 0.5) == 0.0


def test_tiny_samples_give_numbers_not_nan() -> None:
    one_each = np.array([True, False])
    assert auc([1.0, 0.0], one_each) == 1.0
    assert auc([0.0, 1.0], one_each) == 0.0
    tied = roc_curve([3.0, 3.0], one_each)
    np.testing.assert_array_equal(tied.fpr, [0.0, 1.0])
    np.testing.assert_array_equal(tied.tpr, [0.0, 1.0])
    assert auc([3.0, 3.0], one_each) == 0.5
    m = attack_metrics(np.zeros(7), np.arange(7) < 3)
    assert (m.auc, m.advantage, m.tpr_at_fpr[0.01]) == (0.5, 0.0, 0.0)


def test_tpr_at_fpr_with_too_few_non_members_is_the_zero_false_positive_point() -> None:
    # 10 non-members cannot resolve 0.1 % FPR: only thresholds above every non-member qualify.
    members = [9.0, 8.0, 7.0, 3.0]
    nonmembers = [6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0]
    scores = np.array(members + nonmembers)
    member = np.arange(14) < 4
    assert tpr_at_fpr(scores, member, 0.001) == 0.75
    assert tpr_at_fpr(scores, member, 0.3) == 0.75
    assert tpr_at_fpr(scores, member, 0.39) == 0.75  # the member at 3.0 ties a non-member: FPR 0.4
    assert tpr_at_fpr(scores, member, 0.4) == 1.0


@pytest.mark.parametrize(
    ("scores", "member", "message"),
    [
        ([1.0, 2.0], [True, True], "at least one of each"),
        ([1.0, 2.0], [False, False], "at least one of each"),
        ([], np.array([], dtype=bool), "at least one of each"),
        ([1.0, np.nan], [True, False], "scores contains NaN"),
        ([1.0, np.inf], [True, False], "inf"),
        ([1.0, 2.0], [1, 0], "dtype bool"),
        ([1.0, 2.0, 3.0], [True, False], "shape"),
        ([[1.0, 2.0]], [[True, False]], "1-dimensional"),
    ],
)
def test_bad_inputs_are_refused(scores: ArrayLike, member: ArrayLike, message: str) -> None:
    for fn in (roc_curve, auc, membership_advantage):
        with pytest.raises(ProbeInputError, match=message):
            fn(scores, member)


def test_max_fpr_must_be_a_rate() -> None:
    with pytest.raises(ProbeInputError, match="max_fpr"):
        tpr_at_fpr(HAND_SCORES, HAND_MEMBER, 1.5)
    with pytest.raises(ProbeInputError, match="at least one member"):
        auc_null_std(0, 5)
