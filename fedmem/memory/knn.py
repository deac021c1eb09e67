"""kNN probabilities, interpolation with the model, and per-client choice of (lambda, k).

Implements the prediction rule of kNN-Per: Marfoq, Neglia, Vidal, Kameni and Zhang,
"Personalized Federated Learning through Local Memorization", ICML 2022.

A client keeps a datastore of (embedding, label) pairs from its own training split. For a
query x with neighbours (z_j, y_j), j = 1..k, at squared L2 distances d_j:

    w_j          = exp(-d_j / T)                                   (T: temperature)
    p_kNN(c | x) = sum_j w_j 1{y_j = c} / sum_j w_j
    p(c | x)     = lambda * p_kNN(c | x) + (1 - lambda) * p_model(c | x)

and predicts argmax_c p(c | x). lambda in [0, 1] and k are chosen per client on its
validation split (:func:`select_lambda_k`), never on test.

Everything here is a pure function of numpy arrays; the FAISS index that produces the
distances lives in :mod:`fedmem.memory.datastore`.

Conventions
-----------
* Distances are squared L2, as FAISS ``IndexFlatL2`` returns them, sorted ascending per row.
* A neighbour label of -1 marks a missing neighbour (the store holds fewer than k points,
  or an approximate index found fewer); it gets weight 0. A row with no valid neighbour
  gets the uniform distribution 1/C.
* Predictions use :func:`numpy.argmax`, so ties between classes go to the smallest class index.
"""

# p_model must be a probability vector (softmax of the logits). Both reference
# implementations (the authors' code and FL-bench) mix p_kNN with the raw logits instead;
# these functions do not care what p_model holds, so a caller that wants to reproduce that
# behaviour passes logits through an explicitly named compatibility option of its own.

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Selection",
    "accuracy_grid",
    "interpolate",
    "knn_probabilities",
    "select_lambda_k",
]


def _check_neighbours(
    distances: ArrayLike, neighbor_labels: ArrayLike, num_classes: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Validate (n, k) distances and labels; return them as float64 and int64 copies/views."""
    d = np.asarray(distances)
    y = np.asarray(neighbor_labels)
    if d.ndim != 2 or y.ndim != 2 or d.shape != y.shape:
        raise ValueError(
            f"distances and neighbor_labels must both be (n, k) arrays of the same shape; "
            f"got {d.shape} and {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"neighbor_labels must be integers (-1 for a missing neighbour); got {y.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1; got {num_classes}")
    y64 = y.astype(np.int64, copy=False)
    if y64.size and (y64.min() < -1 or y64.max() >= num_classes):
        raise ValueError(
            f"neighbor_labels must lie in [-1, {num_classes - 1}] (-1 = missing); "
            f"got values in [{y64.min()}, {y64.max()}]"
        )
    d64 = d.astype(np.float64, copy=False)
    # Missing neighbours may carry any distance (FAISS puts 3.4e38 there); valid ones must be finite.
    if not np.isfinite(d64[y64 >= 0]).all():
        raise ValueError("distances of valid neighbours (label >= 0) must be finite; found NaN or inf")
    return d64, y64


def knn_probabilities(
    distances: NDArray[np.floating],
    neighbor_labels: NDArray[np.integer],
    num_classes: int,
    temperature: float,
) -> NDArray[np.float64]:
    """Class probabilities from the labels of the k nearest neighbours.

    Parameters
    ----------
    distances:
        (n, k) squared L2 distances to the neighbours, ascending per row.
    neighbor_labels:
        (n, k) integer labels of the neighbours in ``[0, num_classes)``; -1 marks a missing
        neighbour, which gets weight 0 whatever its distance.
    num_classes:
        C, the number of classes.
    temperature:
        T > 0 in ``w = exp(-d / T)``. Small T approaches 1-NN; large T approaches a
        uniform vote of the k neighbours.

    Returns
    -------
    (n, C) float64 array; each row is ``sum_j w_j 1{y_j = c} / sum_j w_j``, or ``1/C`` where
    the row has no valid neighbour.

    Notes
    -----
    The row minimum over valid neighbours is subtracted from the distances before the
    exponential. The ratio is unchanged, the nearest neighbour gets weight exactly 1, so the
    denominator is at least 1 and distances of 1e6 neither underflow every weight to 0 nor
    produce NaN.
    """
    if not temperature > 0 or not np.isfinite(temperature):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")
    d, y = _check_neighbours(distances, neighbor_labels, num_classes)
    n = d.shape[0]
    valid = y >= 0  # (n, k)
    has_any = np.asarray(valid.any(axis=1), dtype=np.bool_)  # (n,)
    # Row minimum over valid neighbours only; 0 for rows without any (they become uniform).
    d_min = np.where(valid, d, np.inf).min(axis=1, initial=np.inf)  # (n,)
    d_min = np.where(has_any, d_min, 0.0)[:, None]  # (n, 1), finite
    # Invalid entries become exactly 0 before the exponential, whatever FAISS put there
    # (3.4e38, inf), so no overflow or inf - inf can occur; their weight is zeroed below.
    shifted = np.where(valid, d, d_min) - d_min  # (n, k), >= 0, 0 at the nearest valid neighbour
    with np.errstate(over="ignore"):  # d / T may overflow to inf for tiny T: weight exp(-inf) = 0
        w = np.where(valid, np.exp(-shifted / temperature), 0.0)  # (n, k), max over valid = 1
    # Scatter-add weights into (n, C) with one bincount over flat indices row * C + label;
    # fancy-index += would drop repeated labels within a row.
    flat = (np.arange(n)[:, None] * num_classes + y)[valid]
    # astype: bincount returns int64 when no weight is given at all (every neighbour missing).
    p = np.bincount(flat, weights=w[valid], minlength=n * num_classes).astype(np.float64)
    p = p.reshape(n, num_classes)
    total = p.sum(axis=1, keepdims=True)  # (n, 1); >= 1 where has_any
    p = np.divide(p, total, out=np.full_like(p, 1.0 / num_classes), where=has_any[:, None])
    return p


def _check_lam(lam: float | NDArray[np.floating], n: int) -> NDArray[np.float64]:
    """Return lambda as a float64 array broadcastable to (n, C): shape () or (n, 1)."""
    lam_arr = np.asarray(lam, dtype=np.float64)
    if lam_arr.ndim == 1:
        if lam_arr.shape[0] != n:
            raise ValueError(f"a per-sample lam must have shape ({n},); got {lam_arr.shape}")
        lam_arr = lam_arr[:, None]
    elif lam_arr.ndim != 0:
        raise ValueError(f"lam must be a scalar or a (n,) array; got shape {lam_arr.shape}")
    if not ((lam_arr >= 0) & (lam_arr <= 1)).all():
        raise ValueError("lam must lie in [0, 1]")
    return lam_arr


def interpolate(
    p_knn: NDArray[np.floating],
    p_model: NDArray[np.floating],
    lam: float | NDArray[np.floating],
) -> NDArray[np.float64]:
    """Mix kNN and model probabilities: ``lam * p_knn + (1 - lam) * p_model``.

    Parameters
    ----------
    p_knn, p_model:
        (n, C) arrays, finite. ``p_model`` is normally the softmax of the model's logits.
    lam:
        A scalar in [0, 1], or an (n,) array with one lambda per sample.

    Returns
    -------
    (n, C) float64 array. ``lam = 0`` returns exactly ``p_model`` and ``lam = 1`` exactly
    ``p_knn`` (0 * x = 0 and x + 0 = x in floating point for finite x).
    """
    a = np.asarray(p_knn, dtype=np.float64)
    b = np.asarray(p_model, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"p_knn and p_model must both be (n, C) of the same shape; got {a.shape} and {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("p_knn and p_model must be finite; found NaN or inf")
    lam_arr = _check_lam(lam, a.shape[0])
    out: NDArray[np.float64] = lam_arr * a + (1.0 - lam_arr) * b
    return out


@dataclass(frozen=True)
class Selection:
    """The (lambda, k) pair chosen on a validation split.

    Attributes
    ----------
    lam:
        The chosen interpolation weight.
    k:
        The chosen number of neighbours.
    accuracy:
        Validation accuracy of the chosen pair.
    grid:
        (len(k_grid), len(lambda_grid)) validation accuracies; ``grid[i, j]`` is for
        ``(k_grid[i], lambda_grid[j])``.
    """

    lam: float
    k: int
    accuracy: float
    grid: NDArray[np.float64]


def accuracy_grid(
    distances: NDArray[np.floating],
    neighbor_labels: NDArray[np.integer],
    p_model: NDArray[np.floating],
    labels: NDArray[np.integer],
    *,
    num_classes: int,
    temperature: float,
    k_grid: Sequence[int],
    lambda_grid: Sequence[float],
) -> NDArray[np.float64]:
    """Accuracy of ``argmax(interpolate(p_kNN(k), p_model, lam))`` for every (k, lam) pair.

    Used on the validation split to choose (lambda, k), and on the test split for the
    oracle (test-tuned) report, which must be labelled as such.

    Parameters
    ----------
    distances, neighbor_labels:
        (n, K) neighbours sorted by ascending distance, ``K >= max(k_grid)``; for each k
        the first k columns are used.
    p_model:
        (n, C) model probabilities.
    labels:
        (n,) true labels in ``[0, num_classes)``.
    num_classes, temperature:
        As in :func:`knn_probabilities`.
    k_grid, lambda_grid:
        Non-empty sequences of k >= 1 and lambda in [0, 1].

    Returns
    -------
    (len(k_grid), len(lambda_grid)) float64 array of accuracies in [0, 1].
    """
    d, y = _check_neighbours(distances, neighbor_labels, num_classes)
    pm = np.asarray(p_model, dtype=np.float64)
    t = np.asarray(labels)
    n, width = d.shape
    if n == 0:
        raise ValueError("cannot measure accuracy on zero samples; the split is empty")
    if pm.shape != (n, num_classes):
        raise ValueError(f"p_model must have shape ({n}, {num_classes}); got {pm.shape}")
    if not np.isfinite(pm).all():
        raise ValueError("p_model must be finite; found NaN or inf")
    if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of shape ({n},); got {t.dtype} {t.shape}")
    ks = [int(k) for k in k_grid]
    if not ks or min(ks) < 1 or max(ks) > width:
        raise ValueError(f"k_grid must be non-empty with 1 <= k <= {width} (columns given); got {ks}")
    lams = np.asarray(lambda_grid, dtype=np.float64)
    if lams.ndim != 1 or lams.size == 0:
        raise ValueError("lambda_grid must be a non-empty sequence of numbers")
    lam3 = _check_lam(lams, lams.size)[:, :, None]  # (L, 1, 1)

    grid = np.empty((len(ks), lams.size), dtype=np.float64)
    for i, k in enumerate(ks):
        p_knn = knn_probabilities(d[:, :k], y[:, :k], num_classes, temperature)  # (n, C)
        # Same arithmetic as interpolate(), broadcast over the lambda grid: (L, n, C) float64,
        # e.g. 11 x 10k x 62 = 55 MB; fine for per-client validation splits.
        mixed = lam3 * p_knn + (1.0 - lam3) * pm
        grid[i] = (mixed.argmax(axis=2) == t).mean(axis=1)  # (L,)
    return grid


def select_lambda_k(
    distances: NDArray[np.floating],
    neighbor_labels: NDArray[np.integer],
    p_model: NDArray[np.floating],
    labels: NDArray[np.integer],
    *,
    num_classes: int,
    temperature: float,
    k_grid: Sequence[int],
    lambda_grid: Sequence[float],
) -> Selection:
    """Choose the (lambda, k) pair with the best validation accuracy.

    Arguments are those of :func:`accuracy_grid`, computed on the client's validation split.

    Returns
    -------
    The :class:`Selection` with the best pair and the full grid.

    Notes
    -----
    Ties go to the first maximum in row-major order over ``(k_grid, lambda_grid)`` as given:
    the earliest k, then within it the earliest lambda. Order the grids so that the pair
    you prefer on a tie comes first (e.g. ascending lambda prefers the model).
    """
    grid = accuracy_grid(
        distances,
        neighbor_labels,
        p_model,
        labels,
        num_classes=num_classes,
        temperature=temperature,
        k_grid=k_grid,
        lambda_grid=lambda_grid,
    )
    # np.argmax returns the first maximum of the row-major flattening.
    i, j = divmod(int(np.argmax(grid)), grid.shape[1])
    return Selection(
        lam=float(lambda_grid[j]),
        k=int(k_grid[i]),
        accuracy=float(grid[i, j]),
        grid=grid,
    )
