"""Metrics of a membership-inference attack: ROC curve, AUC, TPR at low FPR, advantage.

Score convention: every attack in :mod:`fedmem.probes.mia` returns one
membership score per example, **higher = more likely a member**, and these
functions take those scores with a boolean ``is_member`` truth vector.

ROC curve: for every distinct score ``t`` (in decreasing order) the attack
"score >= t means member" gives one point ``(FPR(t), TPR(t))``; the curve starts
at ``(0, 0)`` (threshold ``+inf``) and ends at ``(1, 1)``. Examples with tied
scores enter together, so ties draw a diagonal segment instead of an arbitrary
staircase.

AUC is the Mann-Whitney statistic, i.e. the probability that a random member
outscores a random non-member, ties counting one half::

    AUC = ( #{(i, j): s_i > s_j} + 1/2 #{(i, j): s_i = s_j} ) / (n_members * n_nonmembers)

over member ``i`` and non-member ``j``; it equals the trapezoidal area under the
curve above. Under the null (identical distributions, no ties) its standard
deviation is ``sqrt((n1 + n0 + 1) / (12 n1 n0))`` (Hanley & McNeil, 1982).

TPR at FPR (Carlini et al., "Membership Inference Attacks From First
Principles", IEEE S&P 2022, which argues for it over AUC): the largest TPR
among ROC points with ``FPR <= max_fpr``. When ``max_fpr * n_nonmembers < 1``
only zero false positives qualify, so the figure is noisy: aim for at least
``10 / max_fpr`` non-members.

Membership advantage (Yeom et al., "Privacy Risk in Machine Learning", CSF
2018): ``max |TPR - FPR|`` over ROC points, the best accuracy gain over chance
of a single-threshold attack; the absolute value credits an attack whose
scores are inverted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from fedmem.probes._validate import ProbeInputError, bool_array, float_array, same_shape


def _scores_and_truth(
    scores: ArrayLike, is_member: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    s = float_array(scores, "scores", ndim=1)
    m = bool_array(is_member, "is_member", ndim=1)
    same_shape(s, "scores", m, "is_member")
    n1 = int(m.sum())
    if n1 == 0 or n1 == m.size:
        raise ProbeInputError(
            f"is_member has {n1} members and {m.size - n1} non-members; "
            "the metrics need at least one of each."
        )
    return s, m


@dataclass(frozen=True)
class RocCurve:
    """ROC points of the attack "score >= threshold means member", one per distinct score.

    Attributes
    ----------
    fpr, tpr:
        Shape ``(K + 1,)``, non-decreasing, from ``(0, 0)`` to ``(1, 1)``.
    thresholds:
        Shape ``(K + 1,)``, decreasing; ``thresholds[0] = +inf`` (nothing is called a member).
    """

    fpr: NDArray[np.float64]
    tpr: NDArray[np.float64]
    thresholds: NDArray[np.float64]

    @property
    def auc(self) -> float:
        """Trapezoidal area under the curve (equal to :func:`auc` up to rounding)."""
        return float(np.sum(np.diff(self.fpr) * (self.tpr[1:] + self.tpr[:-1]) / 2.0))

    @property
    def advantage(self) -> float:
        """``max |TPR - FPR|`` over the points of the curve."""
        return float(np.max(np.abs(self.tpr - self.fpr)))

    def tpr_at(self, max_fpr: float) -> float:
        """The largest TPR among points with ``FPR <= max_fpr``."""
        if not 0.0 <= max_fpr <= 1.0:
            raise ProbeInputError(f"max_fpr must lie in [0, 1], got {max_fpr}.")
        # fpr is sorted and starts at 0, so the last point with fpr <= max_fpr has the largest TPR.
        return float(self.tpr[np.searchsorted(self.fpr, max_fpr, side="right") - 1])


def roc_curve(scores: ArrayLike, is_member: ArrayLike) -> RocCurve:
    """ROC curve of membership scores (higher = member), ties handled as one step.

    Parameters
    ----------
    scores:
        Shape ``(n,)``, finite.
    is_member:
        Shape ``(n,)``, bool, with at least one member and one non-member.
    """
    s, m = _scores_and_truth(scores, is_member)
    order = np.argsort(-s, kind="stable")
    s, m = s[order], m[order]
    # Last index of each run of equal scores: all tied examples cross the threshold together.
    last = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    tp = np.cumsum(m)[last]
    fp = last + 1 - tp
    n1 = m.sum()
    return RocCurve(
        fpr=np.concatenate(([0.0], fp / (s.size - n1))),
        tpr=np.concatenate(([0.0], tp / n1)),
        thresholds=np.concatenate(([np.inf], s[last])),
    )


def auc(scores: ArrayLike, is_member: ArrayLike) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic, ties counting 1/2.

    Parameters
    ----------
    scores:
        Shape ``(n,)``, finite, higher = member.
    is_member:
        Shape ``(n,)``, bool, with at least one member and one non-member.
    """
    s, m = _scores_and_truth(scores, is_member)
    n1 = int(m.sum())
    n0 = m.size - n1
    # Average ranks give tied pairs half a win: U = sum of member ranks - n1 (n1 + 1) / 2.
    u = stats.rankdata(s)[m].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def auc_null_std(n_members: int, n_nonmembers: int) -> float:
    """Standard deviation of the AUC when members and non-members share one continuous distribution."""
    if n_members < 1 or n_nonmembers < 1:
        raise ProbeInputError("auc_null_std needs at least one member and one non-member.")
    n1, n0 = float(n_members), float(n_nonmembers)
    return float(np.sqrt((n1 + n0 + 1.0) / (12.0 * n1 * n0)))


def auc_stderr(auc_value: float, n_members: int, n_nonmembers: int) -> float:
    """Analytic standard error of an AUC (Hanley and McNeil, Radiology 1982)::

        Q1 = A / (2 - A),  Q2 = 2 A^2 / (1 + A)
        se = sqrt((A (1 - A) + (n1 - 1)(Q1 - A^2) + (n0 - 1)(Q2 - A^2)) / (n1 n0))

    At ``A = 1/2`` it equals :func:`auc_null_std`; an AUC further from 1/2 than about two of
    these is unlikely to be noise.
    """
    if n_members < 1 or n_nonmembers < 1:
        raise ProbeInputError("auc_stderr needs at least one member and one non-member.")
    if not 0.0 <= auc_value <= 1.0:
        raise ProbeInputError(f"auc_value must lie in [0, 1], got {auc_value}.")
    a, n1, n0 = float(auc_value), float(n_members), float(n_nonmembers)
    q1, q2 = a / (2.0 - a), 2.0 * a * a / (1.0 + a)
    var = (a * (1.0 - a) + (n1 - 1.0) * (q1 - a * a) + (n0 - 1.0) * (q2 - a * a)) / (n1 * n0)
    return float(np.sqrt(max(var, 0.0)))


def tpr_at_fpr(scores: ArrayLike, is_member: ArrayLike, max_fpr: float) -> float:
    """The largest true-positive rate among ROC points with false-positive rate ``<= max_fpr``."""
    return roc_curve(scores, is_member).tpr_at(max_fpr)


def membership_advantage(scores: ArrayLike, is_member: ArrayLike) -> float:
    """Yeom et al.'s membership advantage, ``max |TPR - FPR|`` over all thresholds."""
    return roc_curve(scores, is_member).advantage


@dataclass(frozen=True)
class AttackMetrics:
    """The summary of one attack that fedmem reports."""

    auc: float
    advantage: float
    tpr_at_fpr: dict[float, float]
    n_members: int
    n_nonmembers: int


def attack_metrics(
    scores: ArrayLike, is_member: ArrayLike, max_fprs: Sequence[float] = (0.001, 0.01)
) -> AttackMetrics:
    """AUC, advantage and TPR at each of ``max_fprs`` (default 0.1 % and 1 %) from one ROC pass."""
    curve = roc_curve(scores, is_member)
    n1 = int(np.asarray(is_member).sum())
    return AttackMetrics(
        auc=auc(scores, is_member),
        advantage=curve.advantage,
        tpr_at_fpr={float(f): curve.tpr_at(float(f)) for f in max_fprs},
        n_members=n1,
        n_nonmembers=int(np.asarray(is_member).size) - n1,
    )
