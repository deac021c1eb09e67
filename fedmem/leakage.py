"""What an audit concludes from per-example scores: pure functions from arrays to table rows.

The inputs are the arrays clients return to an audit's score request
(``fedmem.client.score_client``): per example, the ``loss``, the logit-scaled
``confidence`` and ``correct``; the outputs are flat dicts of floats, one per
client and predictor, that :mod:`fedmem.reports.audit` writes as CSV rows. Every statistic
comes from :mod:`fedmem.probes`:

* membership inference on the target federation: Yeom et al.'s loss attack
  (CSF 2018), members = the client's train split, non-members = its test split:
  AUC with its Hanley-McNeil standard error, TPR at 1 % and 0.1 % FPR, the best
  advantage over thresholds and the advantage at Yeom's threshold (the mean
  member loss);
* LiRA over shadow federations, leave-one-out (Carlini et al., S&P 2022): each
  shadow in turn is the target and the others are its shadows; members are the
  examples it kept, non-members those it dropped;
* canary exposure by rank (Carlini et al., USENIX Security 2019);
* client-level counterfactual memorization (Feldman and Zhang, NeurIPS 2020, with
  clients as units) and client inference from a client's mean loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from fedmem.data.membership import INSERTED, NEVER_INSERTED, CanaryPlan
from fedmem.probes import (
    attack_metrics,
    auc,
    auc_stderr,
    client_memorization,
    exposure_by_extrapolation,
    exposure_by_rank,
    lira_offline,
    lira_online,
    roc_curve,
)

ClientScores = Mapping[str, np.ndarray]  # "<set>/<field>" -> (n,) for one client and predictor
FPRS = (0.001, 0.01)
# Below this many shadows per target, per-example LiRA variances are noise: pool one per group
# (Carlini et al. use fixed variance under 64 shadow models).
FIXED_VARIANCE_BELOW = 64


def _attack(scores: np.ndarray, truth: np.ndarray, prefix: str) -> dict[str, float]:
    m = attack_metrics(scores, truth, FPRS)
    return {
        f"{prefix}auc": m.auc,
        f"{prefix}auc_se": auc_stderr(m.auc, m.n_members, m.n_nonmembers),
        f"{prefix}tpr_at_1pct_fpr": m.tpr_at_fpr[0.01],
        f"{prefix}tpr_at_0.1pct_fpr": m.tpr_at_fpr[0.001],
        f"{prefix}advantage": m.advantage,
    }


def membership(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, float]:
    """Loss-threshold attack of one client's predictor: members vs non-members.

    Returns ``mia_auc``, ``mia_auc_se``, ``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr``,
    ``advantage`` (max over thresholds) and ``yeom_advantage`` (TPR - FPR at the threshold
    tau = mean member loss, Yeom et al.'s calibrated decision).
    """
    members, others = np.asarray(member_loss, np.float64), np.asarray(nonmember_loss, np.float64)
    scores = -np.concatenate([members, others])
    truth = np.concatenate([np.ones(len(members), bool), np.zeros(len(others), bool)])
    out = {("mia_" + k if k.startswith("auc") else k): v for k, v in _attack(scores, truth, "").items()}
    tau = float(members.mean())
    out["yeom_advantage"] = float((members <= tau).mean() - (others <= tau).mean())
    return out


def exposure(
    canary_loss: np.ndarray,
    reference_loss: np.ndarray,
    plan: CanaryPlan,
    pid: int,
    *,
    exact_rank: np.ndarray | None = None,
    space: int = 0,
) -> dict[str, float]:
    """Rank exposure of every canary under client ``pid``'s predictor, averaged by kind.

    ``canary_loss`` follows ``plan.canaries`` order. Returns ``exposure_r<r>`` (mean over the
    canaries this client inserted r times; only for inserting clients) and
    ``exposure_extrapolated_r<r>`` (the same from a skew-normal fitted to the references, which
    can exceed ``log2 N``), ``exposure_other_r<r>``
    (canaries other clients inserted r times: what reaches this client through the federation)
    and ``exposure_never`` (never-inserted canaries: the null, about 1 / ln 2 bits).
    With ``exact_rank`` (each canary's rank among all ``space`` secrets of a text format), the
    same three again as ``exposure_exact_*``: ``log2(space) - log2(rank)``, Carlini et al.'s
    Definition 3 without sampling.
    """
    e = exposure_by_rank(canary_loss, reference_loss)
    ext = exposure_by_extrapolation(canary_loss, reference_loss)
    out = _by_kind(e, plan, pid, "exposure_", ext)
    if exact_rank is not None:
        out.update(_by_kind(np.log2(space) - np.log2(exact_rank), plan, pid, "exposure_exact_"))
    return out


def _by_kind(
    e: np.ndarray, plan: CanaryPlan, pid: int, prefix: str, extrapolated: np.ndarray | None = None
) -> dict[str, float]:
    pos = plan.canaries
    kind, owner, reps = plan.kind[pos], plan.owner[pos], plan.repetitions[pos]
    out = {f"{prefix}never": float(e[kind == NEVER_INSERTED].mean())}
    for r in sorted(set(reps[kind == INSERTED].tolist())):
        mine = (kind == INSERTED) & (owner == pid) & (reps == r)
        other = (kind == INSERTED) & (owner != pid) & (reps == r)
        if mine.any():
            out[f"{prefix}r{r}"] = float(e[mine].mean())
            if extrapolated is not None:
                out[f"{prefix}extrapolated_r{r}"] = float(extrapolated[mine].mean())
        if other.any():
            out[f"{prefix}other_r{r}"] = float(e[other].mean())
    return out


def lira_scores(
    confidence: np.ndarray, loss: np.ndarray, keep: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Leave-one-out attack scores over ``M`` shadow federations for one client's predictor.

    Parameters
    ----------
    confidence, loss:
        Shape ``(M, n)``: shadow ``m``'s logit-scaled confidence / loss on each of the client's
        ``n`` train examples.
    keep:
        Shape ``(M, n)``, bool: shadow ``m`` trained on the example.

    Returns
    -------
    dict
        ``{"lira": (scores, truth), "lira_offline": ..., "shadow_loss": ...}``, each pooled over
        the ``M`` targets. An example that is IN (or OUT) of every other shadow has no Gaussian
        to compare with and is left out of that target.
    """
    m_models = confidence.shape[0]
    fixed = m_models - 1 < FIXED_VARIANCE_BELOW
    need = 1 if fixed else 2
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
        "lira": [],
        "lira_offline": [],
        "shadow_loss": [],
    }
    for t in range(m_models):
        others = np.arange(m_models) != t
        n_in = keep[others].sum(axis=0)
        n_out = m_models - 1 - n_in
        ok = (n_in >= need) & (n_out >= need)
        # a pooled variance needs some example with two models in each group
        if not ok.any() or not ((n_in[ok] >= 2).any() and (n_out[ok] >= 2).any()):
            continue
        shadow, mask, target = confidence[others][:, ok], keep[others][:, ok], confidence[t, ok]
        truth = keep[t, ok]
        parts["lira"].append((lira_online(target, shadow, mask, fixed_variance=fixed), truth))
        parts["lira_offline"].append((lira_offline(target, shadow, mask, fixed_variance=fixed), truth))
        parts["shadow_loss"].append((-loss[t, ok], truth))
    return {
        name: (np.concatenate([s for s, _ in p]), np.concatenate([t for _, t in p]))
        for name, p in parts.items()
        if p
    }


def lira(confidence: np.ndarray, loss: np.ndarray, keep: np.ndarray) -> dict[str, float]:
    """LiRA (online and offline) and the loss attack on the same leave-one-out targets.

    Columns ``lira_auc``, ``lira_tpr_at_0.1pct_fpr`` ... , ``lira_offline_*`` and
    ``shadow_loss_*`` (the loss attack on exactly LiRA's targets, for a like-for-like comparison).
    """
    return lira_columns(lira_scores(confidence, loss, keep))


def lira_columns(scored: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The columns of :func:`lira` from :func:`lira_scores`' output (computed once, used twice)."""
    out: dict[str, float] = {}
    for name, (scores, truth) in scored.items():
        if truth.all() or not truth.any():
            continue
        out.update(_attack(scores, truth, f"{name}_"))
    return out


def client_counterfactual(
    participation: np.ndarray, accuracy: np.ndarray, mean_loss: np.ndarray
) -> list[dict[str, float]]:
    """Per client: counterfactual memorization of its train accuracy, and client inference.

    Parameters
    ----------
    participation:
        Shape ``(F, C)``, bool: client ``c`` trained in subsampled federation ``f``.
    accuracy, mean_loss:
        Shape ``(F, C)``: the federation's global model on the client's train split.

    Returns
    -------
    list of dict
        One per client: ``counterfactual_mem`` (accuracy when in minus when out) with its
        Welch ``counterfactual_mem_se``, and ``client_inference_auc`` (does a low mean loss
        reveal participation? AUC over the F federations) with its standard error; empty for
        a client that was in every federation or in none (no counterfactual exists).
    """
    both = np.asarray(
        participation.any(axis=0) & ~participation.all(axis=0), bool
    )  # in some federations, out of others
    est = client_memorization(participation[:, both], accuracy[:, both]) if both.any() else None
    column = np.cumsum(both) - 1
    out: list[dict[str, float]] = []
    for c in range(participation.shape[1]):
        truth = participation[:, c]
        row: dict[str, float] = {}
        if est is not None and both[c]:
            row["counterfactual_mem"] = float(est.value[column[c]])
            row["counterfactual_mem_se"] = float(est.stderr[column[c]])
            a = auc(-mean_loss[:, c], truth)
            row["client_inference_auc"] = a
            row["client_inference_auc_se"] = auc_stderr(a, int(truth.sum()), int((~truth).sum()))
        out.append(row)
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get average ranks); NaN when either side is constant."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def pooled_roc(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC (fpr, tpr) and AUC of scores pooled over clients: ``pairs`` of (scores, truth)."""
    scores = np.concatenate([s for s, _ in pairs])
    truth = np.concatenate([t for _, t in pairs])
    curve = roc_curve(scores, truth)
    return curve.fpr, curve.tpr, curve.auc


def summarize(rows: Sequence[Mapping[str, float]], columns: Sequence[str]) -> dict[str, float]:
    """One predictor's row of ``leakage.csv`` from its per-client rows (the clients to average over).

    Means over clients of every column present; ``mia_auc_se`` becomes the standard error of
    the mean AUC, ``sqrt(sum se_c^2) / C``; ``mia_auc_p90`` and ``advantage_p90`` the 90th
    percentiles over clients.
    """
    out: dict[str, float] = {"clients": float(len(rows))}
    for col in columns:
        values = np.array([r[col] for r in rows if col in r and np.isfinite(r[col])], np.float64)
        if not len(values):
            continue
        if col.endswith("_se"):
            out[col] = float(np.sqrt((values**2).sum()) / len(values))
        else:
            out[col] = float(values.mean())
        if col in ("mia_auc", "advantage", "lira_auc"):
            out[f"{col}_p90"] = float(np.percentile(values, 90))
    return out
