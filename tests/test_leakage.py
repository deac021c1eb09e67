"""The audit's statistics on tiny hand-computed cases, and their null and signal on synthetic scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedmem.data.membership import plan_canaries
from fedmem.leakage import client_counterfactual, exposure, lira, membership, summarize
from fedmem.probes import auc_null_std, auc_stderr, example_scores


def test_membership_by_hand() -> None:
    out = membership(np.array([0.1, 0.2]), np.array([0.3, 0.15]))
    # member scores -0.1, -0.2 vs non-member -0.3, -0.15: 3 of 4 pairs ordered right
    assert out["mia_auc"] == pytest.approx(0.75)
    assert out["mia_auc_se"] == pytest.approx(auc_stderr(0.75, 2, 2))
    # Yeom: tau = mean member loss 0.15 admits 1 of 2 members and 1 of 2 non-members
    assert out["yeom_advantage"] == pytest.approx(0.0)
    assert out["advantage"] == pytest.approx(0.5)  # threshold -0.1: TPR 1/2, FPR 0
    assert out["tpr_at_1pct_fpr"] == pytest.approx(0.5)


def test_auc_stderr_is_the_null_std_at_one_half_and_shrinks_toward_one() -> None:
    assert auc_stderr(0.5, 30, 70) == pytest.approx(auc_null_std(30, 70), rel=1e-12)
    assert auc_stderr(0.9, 30, 70) < auc_stderr(0.7, 30, 70) < auc_stderr(0.5, 30, 70)
    assert auc_stderr(1.0, 30, 70) == 0.0


def test_example_scores_by_hand() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    s = example_scores(probs, np.array([0, 0]))
    assert s["loss"] == pytest.approx([np.log(2), np.log(10)])
    assert s["confidence"] == pytest.approx([0.0, np.log(0.1 / 0.9)])
    assert s["correct"].tolist() == [1.0, 0.0]


def test_exposure_by_kind() -> None:
    # client 7 inserts one canary once (position 0) and one 4 times (1); 2 and 3 are never inserted
    plan = plan_canaries(np.arange(12), np.zeros(12, np.int64), [7], repetitions=(1, 4), per_repetition=1)
    refs = np.arange(1.0, 9.0)  # 8 references
    canary = np.array([4.5, 0.0, 2.5, 20.0])
    out = exposure(canary, refs, plan, pid=7)
    # rank 1 + #{refs <= loss}: 5, 1, 3, 9 -> exposure 3 - log2(rank)
    assert out["exposure_r1"] == pytest.approx(3 - np.log2(5))
    assert out["exposure_r4"] == pytest.approx(3.0)
    assert out["exposure_never"] == pytest.approx(np.mean([3 - np.log2(3), 3 - np.log2(9)]))
    assert "exposure_other_r1" not in out
    other = exposure(canary, refs, plan, pid=2)
    assert "exposure_r1" not in other and other["exposure_other_r4"] == pytest.approx(3.0)


def _shadows(
    effect: float, m: int = 16, n: int = 400, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    keep = r.random((m, n)) < 0.5
    difficulty = r.normal(0, 3, n)  # per-example offsets: what LiRA calibrates and the loss attack cannot
    conf = difficulty[None] + effect * keep + r.normal(0, 1, (m, n))
    return conf, -conf, keep


def test_lira_null_and_signal() -> None:
    conf, loss, keep = _shadows(effect=0.0)
    null = lira(conf, loss, keep)
    assert abs(null["lira_auc"] - 0.5) < 3 * null["lira_auc_se"]
    assert abs(null["shadow_loss_auc"] - 0.5) < 3 * null["shadow_loss_auc_se"]
    conf, loss, keep = _shadows(effect=1.5)
    out = lira(conf, loss, keep)
    # calibrating away each example's difficulty makes LiRA far stronger than a global threshold
    assert out["lira_auc"] > 0.8 > out["shadow_loss_auc"] > 0.55
    assert out["lira_tpr_at_0.1pct_fpr"] >= out["shadow_loss_tpr_at_0.1pct_fpr"]
    assert out["lira_offline_auc"] > out["shadow_loss_auc"]


def test_client_counterfactual_by_hand() -> None:
    part = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], bool)
    acc = np.array([[1.0, 0.5], [0.5, 1.0], [0.9, 0.5], [0.5, 0.8]])
    loss = 1 - acc
    rows = client_counterfactual(part, acc, loss)
    assert rows[0]["counterfactual_mem"] == pytest.approx(0.95 - 0.5)
    assert rows[1]["counterfactual_mem"] == pytest.approx(0.9 - 0.5)
    assert rows[0]["client_inference_auc"] == pytest.approx(1.0)  # lower loss exactly when in


def test_summarize_means_and_pools_standard_errors() -> None:
    rows = [{"mia_auc": 0.5, "mia_auc_se": 0.03}, {"mia_auc": 0.7, "mia_auc_se": 0.04}]
    out = summarize(rows, ["mia_auc", "mia_auc_se"])
    assert out["mia_auc"] == pytest.approx(0.6)
    assert out["mia_auc_se"] == pytest.approx(0.05 / 2)
    assert out["mia_auc_p90"] == pytest.approx(0.68)
    assert out["clients"] == 2


def test_spearman_by_hand() -> None:
    from fedmem.leakage import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))
