"""Loss-threshold attack, logit-scaled confidence and LiRA (online, offline, fixed variance)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from fedmem.probes import (
    ProbeInputError,
    lira_offline,
    lira_online,
    logit_scaled_confidence,
    logit_scaled_confidence_from_logits,
    loss_attack_scores,
    loss_threshold_predict,
    tpr_at_fpr,
)


def test_loss_attack_scores_are_negated_losses() -> None:
    np.testing.assert_array_equal(loss_attack_scores([0.5, 2.0, 0.0]), [-0.5, -2.0, -0.0])
    np.testing.assert_array_equal(loss_threshold_predict([0.5, 2.0, 1.0], 1.0), [True, False, True])


def test_logit_scaled_confidence_hand_values() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    got = logit_scaled_confidence(probs, np.array([0, 2]))
    np.testing.assert_allclose(got, [np.log(0.7 / 0.3), np.log(0.1 / 0.9)])
    from_logits = logit_scaled_confidence_from_logits(np.log(probs) + 5.0, np.array([0, 2]))
    np.testing.assert_allclose(from_logits, got)


def test_logit_scaled_confidence_is_stable_at_the_extremes() -> None:
    # Softmax of these logits rounds to (1, 0, 0); the logit form keeps the exact answer.
    logits = np.array([[1000.0, 0.0, 0.0], [0.0, 800.0, 800.0]])
    np.testing.assert_allclose(
        logit_scaled_confidence_from_logits(logits, np.array([0, 0])),
        [1000.0 - np.log(2.0), -800.0 - np.log(2.0)],
    )
    # From probabilities, clipping at 1e-45 bounds phi by log(1e45) instead of giving inf.
    got = logit_scaled_confidence(np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]), np.array([0, 0]))
    np.testing.assert_allclose(got, [45 * np.log(10.0), -45 * np.log(10.0)])
    # p_y = 1 - 1e-12: summing the other classes keeps the 1e-12 that 1 - p_y would lose to rounding.
    near_one = np.array([[1.0 - 1e-12, 4e-13, 6e-13]])
    assert logit_scaled_confidence(near_one, np.array([0]))[0] == pytest.approx(np.log(1e12), rel=1e-6)


def test_logit_scaled_confidence_keeps_leading_model_axes() -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 5))  # (models, n, C)
    labels = np.array([0, 1, 2, 3, 0])
    got = logit_scaled_confidence(probs, labels)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got[1], logit_scaled_confidence(probs[1], labels))


@pytest.mark.parametrize(
    ("probs", "labels", "message"),
    [
        ([[0.5, 0.5]], [2], r"labels must lie in \[0, 2\)"),
        ([[0.5, 0.5]], [0.0], "labels must be integers"),
        ([[0.5, 0.5]], [0, 1], r"labels must have shape \(1,\)"),
        ([[1.5, -0.5]], [0], r"probs must lie in \[0, 1\]"),
        ([[np.nan, 0.5]], [0], "probs contains NaN"),
        ([[1.0]], [0], "at least 2 classes"),
        ([0.5, 0.5], [0], "probs must be 2 or 3 or 4-dimensional"),
    ],
)
def test_logit_scaled_confidence_rejects_bad_inputs(probs: object, labels: object, message: str) -> None:
    with pytest.raises(ProbeInputError, match=message):
        logit_scaled_confidence(probs, np.asarray(labels))  # type: ignore[arg-type]


# One example, four shadows: IN scores (1, 3) -> N(2, 2); OUT scores (0, 2) -> N(1, 2) (ddof 1).
SHADOW = np.array([[1.0], [3.0], [0.0], [2.0]])
SHADOW_IN = np.array([[True], [True], [False], [False]])


def test_online_lira_hand_value() -> None:
    # log N(2; 2, 2) - log N(2; 1, 2) = 0 + (2 - 1)^2 / (2 * 2) = 0.25
    assert lira_online([2.0], SHADOW, SHADOW_IN)[0] == pytest.approx(0.25, abs=1e-12)
    # At t = 0: -(0 - 2)^2 / 4 + (0 - 1)^2 / 4 = -0.75
    assert lira_online([0.0], SHADOW, SHADOW_IN)[0] == pytest.approx(-0.75, abs=1e-12)


def test_offline_lira_hand_value() -> None:
    assert lira_offline([2.0], SHADOW, SHADOW_IN)[0] == pytest.approx(1 / np.sqrt(2), abs=1e-12)
    # With no mask every shadow is OUT: scores (1, 3, 0, 2) have mean 1.5 and variance 5/3.
    assert lira_offline([2.0], SHADOW)[0] == pytest.approx(0.5 / np.sqrt(5 / 3), abs=1e-12)


def test_fixed_variance_pools_within_example_deviations() -> None:
    # Example 0: IN (1, 3), OUT (0, 2). Example 1: IN (4, 8), OUT (1, 1).
    shadow = np.array([[1.0, 4.0], [3.0, 8.0], [0.0, 1.0], [2.0, 1.0]])
    shadow_in = np.array([[True, True], [True, True], [False, False], [False, False]])
    # Pooled var_in = (2 + 8) / 2 = 5, var_out = (2 + 0) / 2 = 1. Target 6 on example 1:
    # [-log sqrt 5 - 0] - [-log 1 - (6 - 1)^2 / 2] = 12.5 - log(5) / 2.
    got = lira_online([0.0, 6.0], shadow, shadow_in, fixed_variance=True)
    assert got[1] == pytest.approx(12.5 - np.log(5.0) / 2, abs=1e-12)
    assert lira_offline([0.0, 6.0], shadow, shadow_in, fixed_variance=True)[1] == pytest.approx(5.0)
    # Per example, the constant OUT scores of example 1 hit the min_std floor.
    assert lira_offline([0.0, 6.0], shadow, shadow_in, min_std=0.5)[1] == pytest.approx(10.0)


def test_an_augmentation_axis_is_averaged() -> None:
    gen = np.random.default_rng(0)
    shadow = gen.normal(size=(8, 5, 2))  # (models, examples, queries)
    shadow_in = np.arange(8)[:, None] % 2 == np.arange(5)[None, :] % 2
    target = gen.normal(size=(5, 2))
    # Each query gets its own Gaussians; the statistics are averaged over queries.
    for attack in (lira_online, lira_offline):
        per_query = [attack(target[:, a], shadow[:, :, a], shadow_in) for a in range(2)]
        np.testing.assert_allclose(attack(target, shadow, shadow_in), (per_query[0] + per_query[1]) / 2)
        np.testing.assert_allclose(attack(target[:, :1], shadow[:, :, :1], shadow_in), per_query[0])
        assert not np.allclose(per_query[0], per_query[1])


def _synthetic_attack(
    seed: int, n: int, n_shadows: int, balanced: bool, heterogeneous: bool
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
    """Per-example Gaussian IN / OUT scores: returns target scores, shadow scores, shadow mask, truth."""
    gen = np.random.default_rng(seed)
    mu_out = gen.normal(0.0, 4.0, n)  # examples differ in difficulty far more than members from non-members
    if heterogeneous:
        sd_out = gen.uniform(0.5, 2.0, n)
        sd_in = sd_out * gen.uniform(0.5, 1.0, n)
        mu_in = mu_out + gen.uniform(0.0, 4.0, n) * sd_out  # some examples are memorized, some not
    else:
        sd_out = sd_in = np.ones(n)
        mu_in = mu_out + 2.0
    if balanced:
        shadow_in = np.argsort(gen.random((n_shadows, n)), axis=0) < n_shadows // 2
    else:
        shadow_in = gen.random((n_shadows, n)) < 0.5
    shadow = np.where(
        shadow_in, gen.normal(mu_in, sd_in, (n_shadows, n)), gen.normal(mu_out, sd_out, (n_shadows, n))
    )
    member = gen.random(n) < 0.5
    target = np.where(member, gen.normal(mu_in, sd_in), gen.normal(mu_out, sd_out))
    return target, shadow, shadow_in, member


def test_online_beats_offline_beats_a_global_threshold_at_low_fpr() -> None:
    target, shadow, shadow_in, member = _synthetic_attack(0, 20_000, 64, balanced=False, heterogeneous=True)
    # ~10 000 members: a TPR has sd <= 0.005, so margins of 0.02 are many standard errors.
    for fpr in (0.001, 0.01):
        online = tpr_at_fpr(lira_online(target, shadow, shadow_in), member, fpr)
        offline = tpr_at_fpr(lira_offline(target, shadow, shadow_in), member, fpr)
        global_threshold = tpr_at_fpr(target, member, fpr)
        assert online > offline + 0.02, fpr
        assert offline > global_threshold + 0.1, fpr


def test_fixed_variance_rescues_few_shadow_models() -> None:
    # Six shadows, three IN per example: per-example variances from 3 draws are noise.
    target, shadow, shadow_in, member = _synthetic_attack(1, 20_000, 6, balanced=True, heterogeneous=False)
    per_example = tpr_at_fpr(lira_online(target, shadow, shadow_in), member, 0.01)
    fixed = tpr_at_fpr(lira_online(target, shadow, shadow_in, fixed_variance=True), member, 0.01)
    assert fixed > per_example + 0.1


def test_lira_input_errors_name_the_argument_and_the_fix() -> None:
    one_in = np.array([[True], [False], [False]])
    scores = np.zeros((3, 1))
    with pytest.raises(ProbeInputError, match=r"fewer than 2 IN shadow models.*fixed_variance=True"):
        lira_online([0.0], scores, one_in)
    with pytest.raises(ProbeInputError, match="no variance can be pooled"):
        lira_online([0.0], scores, one_in, fixed_variance=True)
    with pytest.raises(ProbeInputError, match="example\\(s\\) 0 have fewer than 1 OUT"):
        lira_offline([0.0], scores, np.ones((3, 1), dtype=bool), fixed_variance=True)
    with pytest.raises(ProbeInputError, match="target_scores must match shadow_scores"):
        lira_online([0.0, 1.0], scores, one_in)
    with pytest.raises(ProbeInputError, match="shadow_in has shape"):
        lira_online([0.0], scores, np.ones((2, 1), dtype=bool))
    with pytest.raises(ProbeInputError, match="shadow_in must have dtype bool"):
        lira_online([0.0], scores, np.ones((3, 1)))
    with pytest.raises(ProbeInputError, match="shadow_scores contains NaN"):
        lira_offline([0.0], np.full((3, 1), np.nan))
    with pytest.raises(ProbeInputError, match="target_scores contains inf"):
        lira_offline([np.inf], scores)
