"""Consistency-score (C-score) proxies (Jiang et al., "Characterizing Structural Regularities of
Labeled Data in Overparameterized Models", ICML 2021).

The C-score of a labelled example is the expected accuracy on it of a model
trained on a random subset of the *other* data, averaged over subset sizes::

    C(x, y) = E_n [ E_{D ~ P^n, (x, y) not in D} Pr[f_D(x) = y] ]

Low C-score marks atypical or mislabelled examples: the ones only memorization
can get right. Three estimators:

* hold-out (the paper's definition, Section 3): from the same membership and
  correctness matrices as :mod:`fedmem.probes.counterfactual`, the mean
  correctness over the models that did **not** train on ``x``, computed per
  subset ratio and averaged over ratios with equal weights::

      C_hat(x) = 1/R sum_r mean_{m: ratio(m) = r, x not in D_m} correct[m, x]

  It is the OUT half of counterfactual memorization. Trust it with tens of OUT
  models per example and ratio.
* kernel density in an embedding space (Section 5, pairwise-distance proxies),
  leave-one-out over the data set itself, with ``K(a, b) = exp(-||a - b||^2 / h^2)``::

      difference:  1/N ( sum_{j != i, y_j = y_i} K(x_j, x_i) - sum_{j != i, y_j != y_i} K(x_j, x_i) )
      ratio:       sum_{j != i, y_j = y_i} K(x_j, x_i) / sum_{j != i} K(x_j, x_i)

  ``difference`` is the paper's label-aware ``C^{+-L}`` proxy (same-label minus
  other-label kernel density, over ``N = n`` points); ``ratio`` is the kernel estimate of
  ``Pr[y_i | x_i]`` (a soft leave-one-out nearest-neighbour accuracy), in [0, 1].
  The default bandwidth sets ``h^2`` to the mean squared distance over all pairs
  (exact, no sampling); the ranking it gives depends on ``h``, so report it.
  Needs no extra training, but is only as good as the embedding.
* learning speed (Section 6): the cumulative training accuracy, i.e. the mean
  over epochs of each example's training correctness (0/1, or the softmax
  confidence of the true label). Examples learned early are regular, ones learned
  late are memorized; it costs one training run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedmem.probes._validate import (
    ProbeInputError,
    bool_array,
    first_indices,
    float_array,
    in_unit_interval,
)
from fedmem.probes.metrics import auc

# Query rows per block of the kernel computation: a (block, n) float64 distance matrix.
_KERNEL_BLOCK = 1024


@dataclass(frozen=True)
class CScoreEstimate:
    """Hold-out C-score per example.

    Attributes
    ----------
    value:
        Shape ``(n,)``: mean over ratios of the OUT-model accuracy.
    stderr:
        Shape ``(n,)``: ``sqrt(sum_r var_r / n_r) / R`` with ddof 1; ``inf`` where some ratio
        has a single OUT model for the example.
    ratios:
        Shape ``(R,)``: the distinct subset ratios (one entry, the mean IN fraction, when none given).
    per_ratio:
        Shape ``(R, n)``: the OUT-model accuracy at each ratio.
    """

    value: NDArray[np.float64]
    stderr: NDArray[np.float64]
    ratios: NDArray[np.float64]
    per_ratio: NDArray[np.float64]


def holdout_cscore(
    membership: ArrayLike, correctness: ArrayLike, *, subset_ratios: ArrayLike | None = None
) -> CScoreEstimate:
    """Hold-out C-score: accuracy on each example of the models not trained on it.

    Parameters
    ----------
    membership:
        Shape ``(M, n)``, bool: model ``m`` trained on example ``i``.
    correctness:
        Shape ``(M, n)``, bool or float in [0, 1]: model ``m`` got example ``i`` right (or its
        probability of the true label).
    subset_ratios:
        Optional shape ``(M,)``: the fraction of the data model ``m`` was trained on. Models are
        grouped by exact value; every example needs an OUT model at every ratio.
    """
    mask = bool_array(membership, "membership", ndim=2)
    correct = float_array(correctness, "correctness", ndim=2)
    if correct.shape != mask.shape:
        raise ProbeInputError(f"correctness has shape {correct.shape} but membership has shape {mask.shape}.")
    in_unit_interval(correct, "correctness")
    if subset_ratios is None:
        ratios = np.array([mask.mean()])
        group = np.zeros(mask.shape[0], dtype=np.intp)
    else:
        r = float_array(subset_ratios, "subset_ratios", ndim=1)
        if r.shape[0] != mask.shape[0]:
            raise ProbeInputError(
                f"subset_ratios has {r.shape[0]} entries but membership has {mask.shape[0]} models."
            )
        ratios, group = np.unique(r, return_inverse=True)
    out = ~mask
    per_ratio = np.empty((ratios.size, mask.shape[1]))
    var_over_n = np.empty_like(per_ratio)
    for g in range(ratios.size):
        w = out[group == g].astype(np.float64)  # (M_g, n)
        c = correct[group == g]
        n_out = w.sum(axis=0)  # (n,)
        if (n_out == 0).any():
            raise ProbeInputError(
                f"membership: example(s) {first_indices(n_out == 0)} are never OUT at subset ratio "
                f"{ratios[g]:g}, so their hold-out accuracy cannot be estimated; train more models."
            )
        mean = np.einsum("mn,mn->n", w, c) / n_out
        var = np.einsum("mn,mn->n", w, (c - mean) ** 2) / np.maximum(n_out - 1.0, 1.0)
        per_ratio[g] = mean
        var_over_n[g] = np.where(n_out >= 2, var / n_out, np.inf)
    return CScoreEstimate(
        value=per_ratio.mean(axis=0),
        stderr=np.sqrt(var_over_n.sum(axis=0)) / ratios.size,
        ratios=ratios.astype(np.float64),
        per_ratio=per_ratio,
    )


def mean_pairwise_sq_distance(embeddings: ArrayLike) -> float:
    """Mean of ``||x_i - x_j||^2`` over ordered pairs ``i != j``, in O(n d).

    Uses ``sum_{i, j} ||x_i - x_j||^2 = 2 n sum_i ||x_i||^2 - 2 ||sum_i x_i||^2``.
    """
    x = float_array(embeddings, "embeddings", ndim=2)
    n = x.shape[0]
    if n < 2:
        raise ProbeInputError(f"embeddings has {n} rows; pairwise distances need at least 2.")
    centred = x - x.mean(axis=0)  # centring leaves distances unchanged and avoids cancellation
    total = 2.0 * n * float(np.sum(centred * centred))
    return total / (n * (n - 1))


def kernel_density_cscore(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    bandwidth: float | None = None,
    variant: Literal["difference", "ratio"] = "difference",
) -> NDArray[np.float64]:
    """Leave-one-out RBF kernel-density C-score proxy in an embedding space.

    Parameters
    ----------
    embeddings:
        Shape ``(n, d)``, finite, ``n >= 2``.
    labels:
        Shape ``(n,)``, integer labels.
    bandwidth:
        ``h`` in ``exp(-||a - b||^2 / h^2)``; default ``sqrt`` of :func:`mean_pairwise_sq_distance`.
    variant:
        ``"difference"`` for Jiang et al.'s ``C^{+-L}`` (same-label minus other-label density,
        over ``N = n``); ``"ratio"`` for the same-label share of the density, in [0, 1].

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)``; higher = more regular (more same-label neighbours nearby).
    """
    x = float_array(embeddings, "embeddings", ndim=2)
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != x.shape[0] or not np.issubdtype(lab.dtype, np.integer):
        raise ProbeInputError(f"labels must be a 1-D integer array of length {x.shape[0]}, got {lab.shape}.")
    if variant not in ("difference", "ratio"):
        raise ProbeInputError(f"variant must be 'difference' or 'ratio', got {variant!r}.")
    h2 = mean_pairwise_sq_distance(x) if bandwidth is None else float(bandwidth) ** 2
    if not np.isfinite(h2) or h2 <= 0.0:
        raise ProbeInputError(
            f"bandwidth must be positive and finite, got {bandwidth} (all points identical?)."
        )
    n = x.shape[0]
    # Sort by label so each class's columns are one contiguous slice: the same-label
    # density is then a slice sum, with no (block, n) mask.
    order = np.argsort(lab, kind="stable")
    x = x[order] - x.mean(axis=0)  # centring keeps |a|^2 + |b|^2 - 2 a.b accurate
    _, starts = np.unique(lab[order], return_index=True)
    ends = np.append(starts[1:], n)
    sq = np.einsum("nd,nd->n", x, x)  # (n,)
    sorted_result = np.empty(n)
    for c_start, c_end in zip(starts.tolist(), ends.tolist(), strict=True):
        for start in range(c_start, c_end, _KERNEL_BLOCK):
            stop = min(start + _KERNEL_BLOCK, c_end)
            # Squared distances of the block's rows to every point, in place: (b, n).
            k = x[start:stop] @ x.T
            k *= -2.0
            k += sq[start:stop, None]
            k += sq[None, :]
            np.maximum(k, 0.0, out=k)
            k[np.arange(stop - start), np.arange(start, stop)] = np.inf  # leave the point itself out
            if variant == "ratio":
                # The ratio does not change when a row is rescaled: shift by the nearest
                # neighbour's distance so at least one kernel value is 1 and the row cannot underflow.
                k -= k.min(axis=1, keepdims=True)
            k *= -1.0 / h2
            np.exp(k, out=k)
            total = k.sum(axis=1)
            same = k[:, c_start:c_end].sum(axis=1)
            sorted_result[start:stop] = same / total if variant == "ratio" else (2.0 * same - total) / n
    result = np.empty(n)
    result[order] = sorted_result
    return result


def learning_speed(training_correctness: ArrayLike) -> NDArray[np.float64]:
    """Cumulative training accuracy per example: the mean over epochs of its correctness.

    Parameters
    ----------
    training_correctness:
        Shape ``(E, n)``, bool or float in [0, 1]: after epoch ``e``, the model classified
        training example ``i`` correctly (or its confidence in the true label).

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)`` in [0, 1]; higher = learned earlier = more regular.
    """
    c = float_array(training_correctness, "training_correctness", ndim=2)
    if c.shape[0] == 0:
        raise ProbeInputError("training_correctness has no epochs (rows).")
    in_unit_interval(c, "training_correctness")
    return np.asarray(c.mean(axis=0))


def noisy_cscore_auc(
    histories: Mapping[int, Mapping[str, np.ndarray]], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """How well the learning-speed C-score proxy finds the flipped train labels, per predictor.

    Learning speed (Jiang et al., ICML 2021, Section 6; :func:`learning_speed`)
    is each example's mean correctness over the recorded evaluations; flipped labels are learned
    late, if at all (Arpit et al., ICML 2017). Ranking examples by *low* learning speed as flipped,
    the AUC (:func:`fedmem.probes.metrics.auc`, ties counting 1/2) is the probability that a
    flipped example was learned more slowly than a clean one of the same ranking: 0.5 is chance.

    Parameters
    ----------
    histories:
        ``{pid: {"flipped": (n,) bool, <label>: (E, n) correctness}}`` (see
        :func:`fedmem.client.correctness_histories`).
    labels:
        The predictors to report, in order.

    Returns
    -------
    dict
        ``{label: {"mean": per-client AUC averaged over the clients with both flipped and clean
        examples, "pooled": the AUC over all their examples together, "clients": how many}}``;
        a label without such a client is left out.
    """
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        per_client, scores, flipped = [], [], []
        for _, h in sorted(histories.items()):
            if label not in h or not 0 < h["flipped"].sum() < h["flipped"].size:
                continue
            slow = -learning_speed(h[label])  # higher = learned later = more likely flipped
            per_client.append(auc(slow, h["flipped"]))
            scores.append(slow)
            flipped.append(h["flipped"])
        if per_client:
            out[label] = {
                "mean": float(np.mean(per_client)),
                "pooled": auc(np.concatenate(scores), np.concatenate(flipped)),
                "clients": len(per_client),
            }
    return out
