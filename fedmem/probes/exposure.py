"""Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary is a random secret (e.g. "the random number is 281265017") inserted
into a client's training data. After training, the model scores the inserted
canary and ``N`` reference candidates from the same format that were never
inserted, by log-perplexity (or loss): lower means the model finds it more
likely. Exposure asks how far up that ranking the inserted canary has climbed.

Rank estimator (Secret Sharer, Definition 3 / Section 4.2)::

    rank     = 1 + #{ j : reference_j <= canary }          (ties count against the canary)
    exposure = log2(N) - log2(rank)

so exposure lies in ``[log2 N - log2(N + 1), log2 N]``: ``log2 N`` when the
canary beats every reference, slightly negative when it loses to all of them.
A canary the model has not memorized has a uniform rank, and its expected
exposure tends to ``1 / ln 2 ~= 1.44`` bits as ``N`` grows.

Extrapolation estimator (Secret Sharer, Section 4.3): the rank estimator cannot
exceed ``log2 N``, so to measure exposures beyond what ``N`` samples resolve,
fit a skew-normal density ``rho`` to the reference perplexities and take::

    exposure = -log2( integral_{-inf}^{canary} rho(x) dx ) = -log2 F_skewnorm(canary)

Trust the rank estimator up to about ``log2 N - 1`` bits; beyond that only the
extrapolation says anything, and only as much as the skew-normal fits the
lower tail of the reference distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from scipy.special import gammaln

from fedmem.probes._validate import ProbeInputError, float_array


def exposure_by_rank(
    canary_perplexities: ArrayLike, reference_perplexities: ArrayLike
) -> NDArray[np.float64]:
    """Exposure of each canary from its rank among never-inserted references.

    Parameters
    ----------
    canary_perplexities:
        Log-perplexity (or loss) of each inserted canary, a scalar or shape ``(n_canaries,)``.
        Lower means more likely under the model. ``+-inf`` is allowed; NaN is not.
    reference_perplexities:
        Log-perplexities of the ``N >= 1`` reference candidates, shape ``(N,)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_canaries,)``: ``log2(N) - log2(1 + #{references <= canary})``.

    Examples
    --------
    >>> exposure_by_rank([0.0, 3.5, 20.0], np.arange(1.0, 17.0)).round(4)
    array([ 4.    ,  2.    , -0.0875])
    """
    canaries = float_array(canary_perplexities, "canary_perplexities", ndim=(0, 1), finite=False).reshape(-1)
    refs = float_array(reference_perplexities, "reference_perplexities", ndim=1, finite=False)
    if refs.size == 0:
        raise ProbeInputError("reference_perplexities is empty; exposure needs at least one reference.")
    # side="right" counts references equal to the canary as beating it, as in the paper's "<=".
    rank = 1 + np.searchsorted(np.sort(refs), canaries, side="right")
    return np.log2(refs.size) - np.log2(rank)


def expected_null_exposure(n_references: int) -> float:
    """Expected rank exposure of a canary drawn from the references' own distribution.

    The rank is then uniform on ``1 .. N + 1``, so the expectation is
    ``log2 N - log2((N + 1)!) / (N + 1)``, which tends to ``1 / ln 2`` bits.
    """
    if n_references < 1:
        raise ProbeInputError(f"n_references must be at least 1, got {n_references}.")
    n = float(n_references)
    return float(np.log2(n) - gammaln(n + 2.0) / ((n + 1.0) * np.log(2.0)))


@dataclass(frozen=True)
class SkewNormalFit:
    """Maximum-likelihood skew-normal fitted to reference perplexities (scipy's parametrisation)."""

    shape: float
    loc: float
    scale: float

    def log2_cdf(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """``log2 F(x)``, computed through ``logcdf`` so tiny tail masses do not underflow to 0."""
        return np.asarray(stats.skewnorm.logcdf(x, self.shape, self.loc, self.scale) / np.log(2.0))


def fit_skew_normal(reference_perplexities: ArrayLike) -> SkewNormalFit:
    """Fit a skew-normal to the reference perplexities by maximum likelihood.

    Parameters
    ----------
    reference_perplexities:
        Shape ``(N,)`` with ``N >= 3`` finite values that are not all equal.
    """
    refs = float_array(reference_perplexities, "reference_perplexities", ndim=1)
    if refs.size < 3:
        raise ProbeInputError(
            f"reference_perplexities has {refs.size} values; a skew-normal fit needs at least 3."
        )
    if np.ptp(refs) == 0.0:
        raise ProbeInputError("reference_perplexities are all equal; a skew-normal cannot be fitted.")
    shape, loc, scale = stats.skewnorm.fit(refs)
    return SkewNormalFit(float(shape), float(loc), float(scale))


def exposure_by_extrapolation(
    canary_perplexities: ArrayLike,
    reference_perplexities: ArrayLike | None = None,
    *,
    fit: SkewNormalFit | None = None,
) -> NDArray[np.float64]:
    """Exposure of each canary as ``-log2`` of a skew-normal CDF fitted to the references.

    Parameters
    ----------
    canary_perplexities:
        Scalar or shape ``(n_canaries,)``, finite.
    reference_perplexities:
        Shape ``(N,)``; fitted with :func:`fit_skew_normal`. Give this or ``fit``.
    fit:
        A fit computed once with :func:`fit_skew_normal`, to score many canaries
        against the same references.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_canaries,)``, non-negative and unbounded above: a canary far below every
        reference gets an exposure well beyond ``log2 N``.
    """
    if fit is None:
        if reference_perplexities is None:
            raise ProbeInputError("give reference_perplexities or a precomputed fit.")
        fit = fit_skew_normal(reference_perplexities)
    elif reference_perplexities is not None:
        raise ProbeInputError("give reference_perplexities or fit, not both.")
    canaries = float_array(canary_perplexities, "canary_perplexities", ndim=(0, 1)).reshape(-1)
    # -0.0 (CDF exactly 1) is reported as 0.0.
    return np.asarray(-fit.log2_cdf(canaries) + 0.0)
