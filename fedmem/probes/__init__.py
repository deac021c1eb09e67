"""Memorization probes: pure functions over numpy arrays of scores, losses and correctness.

One module per probe family, each citing its paper and stating its formula:

* :mod:`~fedmem.probes.exposure` and :mod:`~fedmem.probes.canaries`: canary exposure (Secret Sharer).
* :mod:`~fedmem.probes.metrics`: ROC, AUC, TPR at FPR, membership advantage.
* :mod:`~fedmem.probes.mia`: loss-threshold attack and LiRA.
* :mod:`~fedmem.probes.counterfactual`: counterfactual memorization and influence, per example or client.
* :mod:`~fedmem.probes.cscore`: C-score proxies (hold-out, kernel density, learning speed).

Conventions: membership scores are "higher = more likely a member"; log-perplexities
and losses are "lower = more likely". A bad argument raises :class:`ProbeInputError`
(a :class:`~fedmem.errors.FedmemError` and a :class:`ValueError`) naming the argument.
NaN is always refused; infinities are accepted only by the rank-based exposure.
"""

from fedmem.probes._validate import ProbeInputError
from fedmem.probes.canaries import CanaryFormat, CanarySet, make_canaries, sample_distinct_codes
from fedmem.probes.counterfactual import (
    CounterfactualEstimate,
    client_influence,
    client_memorization,
    counterfactual_influence,
    counterfactual_memorization,
    example_membership,
)
from fedmem.probes.cscore import (
    CScoreEstimate,
    holdout_cscore,
    kernel_density_cscore,
    learning_speed,
    mean_pairwise_sq_distance,
)
from fedmem.probes.exposure import (
    SkewNormalFit,
    expected_null_exposure,
    exposure_by_extrapolation,
    exposure_by_rank,
    fit_skew_normal,
)
from fedmem.probes.metrics import (
    AttackMetrics,
    RocCurve,
    attack_metrics,
    auc,
    auc_null_std,
    auc_stderr,
    membership_advantage,
    roc_curve,
    tpr_at_fpr,
)
from fedmem.probes.mia import (
    example_scores,
    lira_offline,
    lira_online,
    logit_scaled_confidence,
    logit_scaled_confidence_from_logits,
    loss_attack_scores,
    loss_threshold_predict,
)

__all__ = [
    "AttackMetrics",
    "CScoreEstimate",
    "CanaryFormat",
    "CanarySet",
    "CounterfactualEstimate",
    "ProbeInputError",
    "RocCurve",
    "SkewNormalFit",
    "attack_metrics",
    "auc",
    "auc_null_std",
    "auc_stderr",
    "client_influence",
    "client_memorization",
    "counterfactual_influence",
    "counterfactual_memorization",
    "example_membership",
    "example_scores",
    "expected_null_exposure",
    "exposure_by_extrapolation",
    "exposure_by_rank",
    "fit_skew_normal",
    "holdout_cscore",
    "kernel_density_cscore",
    "learning_speed",
    "lira_offline",
    "lira_online",
    "logit_scaled_confidence",
    "logit_scaled_confidence_from_logits",
    "loss_attack_scores",
    "loss_threshold_predict",
    "make_canaries",
    "mean_pairwise_sq_distance",
    "membership_advantage",
    "roc_curve",
    "sample_distinct_codes",
    "tpr_at_fpr",
]
