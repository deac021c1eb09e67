"""Canary exposure: the Secret Sharer test vectors, the null expectation, the skew-normal fit."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import ArrayLike
from scipy import stats

from fedmem.probes import (
    ProbeInputError,
    SkewNormalFit,
    expected_null_exposure,
    exposure_by_extrapolation,
    exposure_by_rank,
    fit_skew_normal,
)

REFS_1_TO_16 = np.arange(1.0, 17.0)


def test_rank_exposure_reproduces_the_published_vectors() -> None:
    got = exposure_by_rank([0.0, 0.1, 20.0, 3.5], REFS_1_TO_16)
    np.testing.assert_array_equal(got[:2], [4.0, 4.0])
    assert got[2] == pytest.approx(np.log2(16) - np.log2(17), abs=1e-12)
    assert got[3] == pytest.approx(2.0, abs=1e-12)


def test_rank_counts_ties_against_the_canary() -> None:
    # Three references (1, 2, 3) are <= 3.0, so the rank is 4, as for 3.5.
    np.testing.assert_allclose(exposure_by_rank([3.0, 2.999], REFS_1_TO_16), [2.0, np.log2(16 / 3)])


def test_rank_exposure_accepts_a_scalar_and_unsorted_references() -> None:
    got = exposure_by_rank(3.5, REFS_1_TO_16[::-1])
    assert got.shape == (1,)
    assert got[0] == pytest.approx(2.0)


def test_expected_null_exposure_is_the_mean_over_uniform_ranks() -> None:
    # Canaries halfway between consecutive references take every rank 1..17 once.
    canaries = np.arange(0.5, 17.0, 1.0)
    assert exposure_by_rank(canaries, REFS_1_TO_16).mean() == pytest.approx(
        expected_null_exposure(16), abs=1e-12
    )
    assert expected_null_exposure(10**6) == pytest.approx(1 / np.log(2), abs=1e-4)


def test_never_inserted_canaries_average_one_over_ln2_bits() -> None:
    # 200 independent reference sets of N = 2000, 100 null canaries each. A null exposure is
    # about Exp(1) / ln 2 (sd 1.44), so the 20 000-canary mean has sd ~0.0102, plus ~0.0033
    # from sharing reference sets: 0.045 is over 4 standard errors.
    gen = np.random.default_rng(2019)
    means = [exposure_by_rank(gen.normal(size=100), gen.normal(size=2000)).mean() for _ in range(200)]
    assert np.mean(means) == pytest.approx(expected_null_exposure(2000), abs=0.045)
    assert expected_null_exposure(2000) == pytest.approx(1 / np.log(2), abs=0.005)


def test_extrapolation_of_a_known_normal_fit_is_exact() -> None:
    fit = SkewNormalFit(shape=0.0, loc=0.0, scale=1.0)
    got = exposure_by_extrapolation([0.0, stats.norm.ppf(0.05), 40.0], fit=fit)
    np.testing.assert_allclose(got, [1.0, -np.log2(0.05), 0.0], atol=1e-12)


def test_extrapolation_recovers_a_skew_normal_and_goes_beyond_log2_n() -> None:
    gen = np.random.default_rng(7)
    refs = stats.skewnorm.rvs(4.0, loc=10.0, scale=3.0, size=20_000, random_state=gen)
    fit = fit_skew_normal(refs)
    assert (fit.shape, fit.loc, fit.scale) == pytest.approx((4.0, 10.0, 3.0), rel=0.1)
    median = stats.skewnorm.median(4.0, loc=10.0, scale=3.0)
    far_below = refs.min() - 2.0
    got = exposure_by_extrapolation([median, far_below], refs)
    assert got[0] == pytest.approx(1.0, abs=0.03)
    assert got[1] > np.log2(refs.size) + 5  # the rank estimator caps at log2 N ~ 14.3
    assert exposure_by_rank(far_below, refs)[0] == pytest.approx(np.log2(refs.size))


def test_extrapolation_is_decreasing_in_perplexity() -> None:
    refs = np.random.default_rng(3).gamma(4.0, size=500)
    got = exposure_by_extrapolation(np.linspace(0.0, 20.0, 50), refs)
    assert np.all(np.diff(got) <= 0) and got.min() >= 0.0


@pytest.mark.parametrize(
    ("canaries", "refs", "message"),
    [
        ([1.0], [], "empty"),
        ([np.nan], REFS_1_TO_16, "canary_perplexities contains NaN"),
        ([1.0], [1.0, np.nan], "reference_perplexities contains NaN"),
        ([[1.0]], REFS_1_TO_16, "canary_perplexities must be 0 or 1-dimensional"),
    ],
)
def test_rank_exposure_rejects_bad_arrays(canaries: ArrayLike, refs: ArrayLike, message: str) -> None:
    with pytest.raises(ProbeInputError, match=message):
        exposure_by_rank(canaries, refs)


def test_extrapolation_rejects_bad_inputs() -> None:
    with pytest.raises(ProbeInputError, match="all equal"):
        fit_skew_normal(np.ones(10))
    with pytest.raises(ProbeInputError, match="at least 3"):
        fit_skew_normal([1.0, 2.0])
    with pytest.raises(ProbeInputError, match="not both"):
        exposure_by_extrapolation([1.0], REFS_1_TO_16, fit=SkewNormalFit(0.0, 0.0, 1.0))
    with pytest.raises(ProbeInputError, match="give reference_perplexities"):
        exposure_by_extrapolation([1.0])
    with pytest.raises(ProbeInputError, match="inf"):
        exposure_by_extrapolation([np.inf], fit=SkewNormalFit(0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="n_references"):
        expected_null_exposure(0)
