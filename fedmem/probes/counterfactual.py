"""Counterfactual memorization and influence, per example and per client.

Feldman & Zhang, "What Neural Networks Memorize and Why: Discovering the Long
Tail via Influence Estimation" (NeurIPS 2020), and Zhang et al.,
"Counterfactual Memorization in Neural Language Models" (NeurIPS 2023), train
many models on random subsets of the data and compare each example's outcome
between the models that saw it (IN) and those that did not (OUT). Given a
membership matrix ``M`` (models x examples, bool) and a score matrix ``S`` of the
same models (correctness in {0, 1}, or a score such as the probability of the
true label)::

    mem_i       = mean_{m: M[m, i]} S[m, i]  - mean_{m: not M[m, i]} S[m, i]
    infl_{i, j} = mean_{m: M[m, i]} T[m, j]  - mean_{m: not M[m, i]} T[m, j]

where ``T`` (models x test examples) scores held-out examples ``j``; ``mem_i`` is
the influence of ``i`` on itself. Each estimate is a difference of two sample
means, so its standard error is Welch's::

    se = sqrt( var_in / n_in + var_out / n_out ),   var with ddof = 1,

reported as ``inf`` where ``n_in`` or ``n_out`` is 1 (one model gives no variance).
An example that is never IN or never OUT has no estimate at all and is an error.

Client granularity: in a federation the natural unit is a client. Replace
"models" by simulated federations and "examples" by clients: ``participation``
(federations x clients) says which clients took part in each federation, and
``client_scores`` holds each client's outcome (e.g. accuracy of the final model
on the client's own training data). The estimator is the same.

When to trust it: with subsets of half the data, ``n_in ~ n_out ~ M / 2`` and a
0/1 score has ``se <= 1 / sqrt(M / 2)``; Feldman & Zhang use a few thousand
models for per-example values and Zhang et al. a few hundred, while tens of
models already rank the most-memorized examples. Read ``stderr`` before reading
differences between examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedmem.probes._validate import ProbeInputError, bool_array, first_indices, float_array

# Rows of the (train x test) influence matrix computed per block, so the
# temporaries stay a few times the block size instead of the whole matrix.
_INFLUENCE_BLOCK = 512


@dataclass(frozen=True)
class CounterfactualEstimate:
    """Difference-of-means estimates with their Welch standard errors.

    Attributes
    ----------
    value:
        ``mean_in - mean_out``; shape ``(n,)`` for memorization, ``(n_train, n_test)`` for influence.
    stderr:
        Same shape; ``inf`` where ``n_in`` or ``n_out`` is 1.
    n_in, n_out:
        Shape ``(n,)`` or ``(n_train,)``: how many models were IN / OUT for each unit.
    """

    value: NDArray[np.float64]
    stderr: NDArray[np.float64]
    n_in: NDArray[np.int64]
    n_out: NDArray[np.int64]


def _membership(
    membership: ArrayLike, name: str, unit: str, index: NDArray[np.intp] | None = None
) -> NDArray[np.bool_]:
    """Check every column is IN and OUT at least once; ``index`` maps columns back for messages."""
    mask = bool_array(membership, name, ndim=2)
    n_in = mask.sum(axis=0)
    for bad, what in (
        (n_in == 0, "never IN (in no model's training set)"),
        (n_in == mask.shape[0], "never OUT (in every model's training set)"),
    ):
        if bad.any():
            raise ProbeInputError(
                f"{name}: {unit}(s) {first_indices(bad, index)} are {what}, so no counterfactual can be "
                f"estimated ({int(bad.sum())} in all); resample the subsets or drop those {unit}s."
            )
    return mask


def _welch_stderr(
    var_in: NDArray[np.float64],
    n_in: NDArray[np.float64],
    var_out: NDArray[np.float64],
    n_out: NDArray[np.float64],
) -> NDArray[np.float64]:
    ok = (n_in >= 2) & (n_out >= 2)
    se = np.full(np.broadcast_shapes(var_in.shape, n_in.shape), np.inf)
    np.sqrt(var_in / n_in + var_out / n_out, out=se, where=ok)
    return se


def _memorization(
    membership: ArrayLike, scores: ArrayLike, mask_name: str, score_name: str, unit: str
) -> CounterfactualEstimate:
    mask = _membership(membership, mask_name, unit)
    s = float_array(scores, score_name, ndim=2)
    if s.shape != mask.shape:
        raise ProbeInputError(f"{score_name} has shape {s.shape} but {mask_name} has shape {mask.shape}.")
    w_in = mask.astype(np.float64)  # (M, n)
    w_out = 1.0 - w_in
    n_in, n_out = w_in.sum(axis=0), w_out.sum(axis=0)  # (n,)
    mean_in = np.einsum("mn,mn->n", w_in, s) / n_in
    mean_out = np.einsum("mn,mn->n", w_out, s) / n_out
    # Clip the ddof=1 denominators at 1: where they are 0 the stderr is inf anyway.
    var_in = np.einsum("mn,mn->n", w_in, (s - mean_in) ** 2) / np.maximum(n_in - 1.0, 1.0)
    var_out = np.einsum("mn,mn->n", w_out, (s - mean_out) ** 2) / np.maximum(n_out - 1.0, 1.0)
    return CounterfactualEstimate(
        value=mean_in - mean_out,
        stderr=_welch_stderr(var_in, n_in, var_out, n_out),
        n_in=n_in.astype(np.int64),
        n_out=n_out.astype(np.int64),
    )


def _influence(
    membership: ArrayLike,
    scores: ArrayLike,
    rows: ArrayLike | None,
    mask_name: str,
    score_name: str,
    unit: str,
) -> CounterfactualEstimate:
    mask = bool_array(membership, mask_name, ndim=2)
    s = float_array(scores, score_name, ndim=2)
    if s.shape[0] != mask.shape[0]:
        raise ProbeInputError(
            f"{score_name} has {s.shape[0]} models (rows) but {mask_name} has {mask.shape[0]}; "
            "they must match."
        )
    idx = None
    if rows is not None:
        idx = np.asarray(rows)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ProbeInputError(f"the selected {unit} indices must be a 1-D integer array.")
        if idx.size == 0 or idx.min() < 0 or idx.max() >= mask.shape[1]:
            raise ProbeInputError(
                f"the selected {unit} indices must be non-empty and lie in [0, {mask.shape[1]})."
            )
        mask = mask[:, idx]
    mask = _membership(mask, mask_name, unit, idx)
    # Centring each test column leaves differences and variances unchanged, avoids
    # cancellation in E[T^2] - E[T]^2 below, and makes the OUT sums free: with
    # sum_m t[m, j] = 0, the OUT sum is minus the IN sum.
    t = s - s.mean(axis=0)  # (M, n_test)
    t2 = t * t
    t2_total = t2.sum(axis=0)  # (n_test,)
    n_in = mask.sum(axis=0).astype(np.float64)  # (k,)
    n_out = mask.shape[0] - n_in
    k, n_test = mask.shape[1], t.shape[1]
    value = np.empty((k, n_test))
    stderr = np.empty((k, n_test))
    for start in range(0, k, _INFLUENCE_BLOCK):
        block = slice(start, start + _INFLUENCE_BLOCK)
        w_in = mask[:, block].T.astype(np.float64)  # (b, M)
        ni, no = n_in[block, None], n_out[block, None]  # (b, 1)
        sum_in = w_in @ t  # (b, n_test); the OUT sum is -sum_in
        ss_in = w_in @ t2  # (b, n_test); the OUT sum of squares is t2_total - ss_in
        value[block] = sum_in * (1.0 / ni + 1.0 / no)  # sum_in / ni - (-sum_in) / no
        # Centred sums of squares, sum t^2 - (sum t)^2 / count, in place to keep the
        # passes over these (b, n_test) arrays few; rounding can dip below 0, so clip.
        sum_in *= sum_in
        ss_out = t2_total - ss_in
        ss_out -= sum_in * (1.0 / no)
        ss_in -= sum_in * (1.0 / ni)
        np.maximum(ss_in, 0.0, out=ss_in)
        np.maximum(ss_out, 0.0, out=ss_out)
        # se^2 = var_in / ni + var_out / no with var = ss / (count - 1).
        ss_in *= 1.0 / (ni * np.maximum(ni - 1.0, 1.0))
        ss_out *= 1.0 / (no * np.maximum(no - 1.0, 1.0))
        ss_in += ss_out
        np.sqrt(ss_in, out=ss_in)
        stderr[block] = np.where((ni >= 2) & (no >= 2), ss_in, np.inf)
    return CounterfactualEstimate(value, stderr, n_in.astype(np.int64), n_out.astype(np.int64))


def counterfactual_memorization(membership: ArrayLike, scores: ArrayLike) -> CounterfactualEstimate:
    """Per-example counterfactual memorization ``mem_i = mean_IN S[:, i] - mean_OUT S[:, i]``.

    Parameters
    ----------
    membership:
        Shape ``(M, n)``, bool: ``membership[m, i]`` is True when model ``m`` trained on example ``i``.
        Every example must be IN for at least one model and OUT for at least one.
    scores:
        Shape ``(M, n)``, finite: model ``m``'s score on training example ``i`` (correctness,
        probability of the true label, negative loss...).

    Returns
    -------
    CounterfactualEstimate
        ``value`` and ``stderr`` of shape ``(n,)``.
    """
    return _memorization(membership, scores, "membership", "scores", "example")


def counterfactual_influence(
    membership: ArrayLike, test_scores: ArrayLike, *, train_indices: ArrayLike | None = None
) -> CounterfactualEstimate:
    """Influence of each training example on each test example, ``infl[i, j]``.

    Parameters
    ----------
    membership:
        Shape ``(M, n_train)``, bool.
    test_scores:
        Shape ``(M, n_test)``, finite: model ``m``'s score on test example ``j``.
    train_indices:
        Optional integer indices of the training examples to report (rows of the result).
        The result holds ``len(train_indices) x n_test`` floats twice (value and stderr):
        at 60k x 60k that is 58 GB, so pass a subset of test columns, or of training rows
        here, and loop over blocks.

    Returns
    -------
    CounterfactualEstimate
        ``value`` and ``stderr`` of shape ``(n_selected_train, n_test)``.
    """
    return _influence(membership, test_scores, train_indices, "membership", "test_scores", "example")


def client_memorization(participation: ArrayLike, client_scores: ArrayLike) -> CounterfactualEstimate:
    """Counterfactual memorization of whole clients across simulated federations.

    Parameters
    ----------
    participation:
        Shape ``(F, C)``, bool: client ``c`` took part in federation ``f``.
    client_scores:
        Shape ``(F, C)``, finite: client ``c``'s outcome under federation ``f``'s model
        (e.g. accuracy on the client's own training data), whether or not it took part.

    Returns
    -------
    CounterfactualEstimate
        ``value`` and ``stderr`` of shape ``(C,)``.
    """
    return _memorization(participation, client_scores, "participation", "client_scores", "client")


def client_influence(
    participation: ArrayLike, eval_scores: ArrayLike, *, client_indices: ArrayLike | None = None
) -> CounterfactualEstimate:
    """Influence of each client's participation on each evaluation unit (client or example).

    Parameters
    ----------
    participation:
        Shape ``(F, C)``, bool.
    eval_scores:
        Shape ``(F, n_eval)``: federation ``f``'s score on evaluation unit ``j``.
    client_indices:
        Optional integer indices of the clients to report.

    Returns
    -------
    CounterfactualEstimate
        ``value`` and ``stderr`` of shape ``(n_selected_clients, n_eval)``.
    """
    return _influence(participation, eval_scores, client_indices, "participation", "eval_scores", "client")


def example_membership(participation: ArrayLike, client_of_example: ArrayLike) -> NDArray[np.bool_]:
    """Expand client participation ``(F, C)`` to example membership ``(F, n)``.

    ``client_of_example[i]`` is the client holding example ``i``; an example is IN a
    federation exactly when its client took part.
    """
    part = bool_array(participation, "participation", ndim=2)
    owner = np.asarray(client_of_example)
    if owner.ndim != 1 or not np.issubdtype(owner.dtype, np.integer):
        raise ProbeInputError("client_of_example must be a 1-D integer array of client indices.")
    if owner.size and (owner.min() < 0 or owner.max() >= part.shape[1]):
        raise ProbeInputError(
            f"client_of_example must lie in [0, {part.shape[1]}) for {part.shape[1]} clients."
        )
    return part[:, owner]
