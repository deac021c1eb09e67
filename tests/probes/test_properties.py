"""Property tests: shapes, bounds, NaN rejection and the never-IN error, over generated arrays."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from fedmem.probes import (
    ProbeInputError,
    auc,
    counterfactual_influence,
    counterfactual_memorization,
    exposure_by_rank,
    holdout_cscore,
    lira_offline,
    lira_online,
    roc_curve,
)

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
# Few distinct values so ties are common.
tied = st.sampled_from([-1.0, 0.0, 0.5, 2.0, 7.0])


@FAST
@given(
    canaries=hnp.arrays(np.float64, st.integers(0, 20), elements=st.floats(allow_nan=False)),
    refs=hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(allow_nan=False)),
)
def test_rank_exposure_is_bounded_by_log2_n(canaries: np.ndarray, refs: np.ndarray) -> None:
    got = exposure_by_rank(canaries, refs)
    n = refs.size
    assert got.shape == canaries.shape
    assert np.all(got <= np.log2(n))
    assert np.all(got >= np.log2(n) - np.log2(n + 1) - 1e-12)


@st.composite
def labelled_scores(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(2, 40))
    scores = draw(hnp.arrays(np.float64, n, elements=st.one_of(tied, finite)))
    member = draw(hnp.arrays(np.bool_, n))
    i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
    member[i], member[j] = True, False
    return scores, member


@FAST
@given(labelled_scores())
def test_roc_is_a_monotone_path_and_its_area_is_mann_whitney(data: tuple[np.ndarray, np.ndarray]) -> None:
    scores, member = data
    curve = roc_curve(scores, member)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    assert np.all(np.diff(curve.thresholds) < 0)
    u = stats.mannwhitneyu(scores[member], scores[~member]).statistic
    expected = u / (member.sum() * (~member).sum())
    assert auc(scores, member) == pytest.approx(expected, abs=1e-9)
    assert curve.auc == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= curve.advantage <= 1.0
    tprs = [curve.tpr_at(f) for f in (0.0, 0.01, 0.1, 0.5, 1.0)]
    assert tprs == sorted(tprs) and tprs[-1] == 1.0


@st.composite
def membership_and_scores(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    m = draw(st.integers(4, 12))
    n = draw(st.integers(1, 15))
    membership = draw(hnp.arrays(np.bool_, (m, n)))
    # Guarantee two IN and two OUT models per example so every estimator is defined.
    membership[:2], membership[2:4] = True, False
    scores = draw(hnp.arrays(np.float64, (m, n), elements=st.floats(0, 1)))
    return membership, scores


@FAST
@given(membership_and_scores())
def test_estimators_return_one_value_per_example(data: tuple[np.ndarray, np.ndarray]) -> None:
    membership, scores = data
    m, n = scores.shape
    mem = counterfactual_memorization(membership, scores)
    assert mem.value.shape == mem.stderr.shape == (n,)
    assert np.all(np.abs(mem.value) <= 1.0 + 1e-12) and np.all(mem.stderr >= 0)
    np.testing.assert_array_equal(mem.n_in + mem.n_out, np.full(n, m))
    infl = counterfactual_influence(membership, scores[:, :3])
    assert infl.value.shape == (n, min(3, n))
    np.testing.assert_allclose(np.diag(infl.value[: min(3, n)]), mem.value[: min(3, n)], atol=1e-9)
    assert holdout_cscore(membership, scores).value.shape == (n,)
    assert lira_online(scores[0], scores, membership).shape == (n,)
    assert lira_offline(scores[0], scores, membership, fixed_variance=True).shape == (n,)


ESTIMATORS: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
    "counterfactual_memorization": counterfactual_memorization,
    "counterfactual_influence": counterfactual_influence,
    "holdout_cscore": holdout_cscore,
    "lira_online": lambda mask, s: lira_online(np.zeros(s.shape[1]), s, mask),
}


@FAST
@given(membership_and_scores(), st.data())
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_a_nan_score_is_refused(name: str, data: tuple[np.ndarray, np.ndarray], draw: st.DataObject) -> None:
    membership, scores = data
    i = draw.draw(st.integers(0, scores.shape[0] - 1))
    j = draw.draw(st.integers(0, scores.shape[1] - 1))
    scores = scores.copy()
    scores[i, j] = np.nan
    with pytest.raises(ProbeInputError, match="NaN"):
        ESTIMATORS[name](membership, scores)


@FAST
@given(labelled_scores(), st.data())
def test_a_nan_membership_score_is_refused(data: tuple[np.ndarray, np.ndarray], draw: st.DataObject) -> None:
    scores, member = data
    scores = scores.copy()
    scores[draw.draw(st.integers(0, scores.size - 1))] = np.nan
    with pytest.raises(ProbeInputError, match="NaN"):
        auc(scores, member)
    with pytest.raises(ProbeInputError, match="NaN"):
        exposure_by_rank(scores, np.arange(3.0))


@FAST
@given(membership_and_scores(), st.data())
@pytest.mark.parametrize(
    ("name", "never_in"),
    [
        ("counterfactual_memorization", True),
        ("counterfactual_memorization", False),
        ("counterfactual_influence", True),
        ("counterfactual_influence", False),
        ("holdout_cscore", False),  # the hold-out C-score needs OUT models only
    ],
)
def test_an_example_never_in_or_never_out_is_an_error(
    name: str, never_in: bool, data: tuple[np.ndarray, np.ndarray], draw: st.DataObject
) -> None:
    membership, scores = data
    j = draw.draw(st.integers(0, scores.shape[1] - 1))
    membership = membership.copy()
    membership[:, j] = not never_in
    with pytest.raises(ProbeInputError, match=rf"\b{j}\b.*never {'IN' if never_in else 'OUT'}"):
        ESTIMATORS[name](membership, scores)
