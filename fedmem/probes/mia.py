"""Membership-inference attacks over given per-example model outputs.

Every attack returns one membership score per example, **higher = more likely
a member**, ready for :mod:`fedmem.probes.metrics`.

Loss threshold (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting", CSF 2018): a model fits its training examples
better, so predict "member" when ``loss(x) <= tau``. As a score over all
thresholds at once this is ``-loss(x)``; Yeom et al. set ``tau`` to the mean
training loss.

LiRA, the likelihood-ratio attack (Carlini et al., "Membership Inference
Attacks From First Principles", IEEE S&P 2022). Per-example difficulty varies
a lot, so a global threshold mistakes easy non-members for members. LiRA
instead trains shadow models, some with example ``x`` (IN) and some without
(OUT), and compares the target model's output on ``x`` with those two
per-example distributions. Outputs are first made near-Gaussian by the
logit-scaled confidence of the true label ``y``::

    phi(x) = log p_y(x) - log sum_{y' != y} p_y'(x)

With ``mu_in(x), sigma_in(x)`` and ``mu_out(x), sigma_out(x)`` the mean and
sample standard deviation (ddof 1) of ``phi`` over the IN and OUT shadow models:

* online:   ``Lambda(x) = log N(phi; mu_in, sigma_in^2) - log N(phi; mu_out, sigma_out^2)``,
  the log likelihood ratio (needs shadows trained on the targets);
* offline:  a one-sided test against OUT alone, ``Lambda = Pr[Z <= phi]`` with
  ``Z ~ N(mu_out, sigma_out^2)``. We return the z-score ``(phi - mu_out) / sigma_out``, a
  strictly increasing function of that probability, so the ROC is identical and
  the far tail keeps its resolution instead of rounding to 1;
* fixed variance: with few shadow models per-example variances are noise, so
  one variance per group (IN, OUT) is pooled over all examples,
  ``sigma^2 = sum_x sum_{m in group} (phi_m(x) - mu(x))^2 / sum_x (n_group(x) - 1)``.
  (The authors' reference code takes the standard deviation of all scores around
  their global mean, which also counts the spread of means across examples;
  pooling around per-example means is the variance the model assumes.)

When shadow scores carry an augmentation axis (several queries of one example,
e.g. flips), each query gets its own Gaussians and the per-query statistics are
averaged, as in the paper.

When to trust it: online with per-example variances needs about 16+ IN and 16+
OUT shadows per example (the paper's curves saturate near 64 shadow models in
total); below that use ``fixed_variance=True``. Offline needs only OUT shadows and
is the choice when shadows cannot be trained on the target examples.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import logsumexp

from fedmem.probes._validate import (
    ProbeInputError,
    bool_array,
    first_indices,
    float_array,
    in_unit_interval,
)


def loss_attack_scores(losses: ArrayLike) -> NDArray[np.float64]:
    """Yeom et al.'s loss attack as membership scores: ``-loss``, shape ``(n,)``."""
    return -float_array(losses, "losses", ndim=1)


def loss_threshold_predict(losses: ArrayLike, threshold: float) -> NDArray[np.bool_]:
    """Yeom et al.'s decision: member iff ``loss <= threshold`` (e.g. the mean training loss)."""
    return float_array(losses, "losses", ndim=1) <= threshold


def _labels_for(labels: ArrayLike, n: int, n_classes: int) -> NDArray[np.intp]:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ProbeInputError(f"labels must have shape ({n},) to match the examples, got {lab.shape}.")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ProbeInputError(f"labels must be integers, got dtype {lab.dtype}.")
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise ProbeInputError(f"labels must lie in [0, {n_classes}) for {n_classes} classes.")
    return lab.astype(np.intp)


def logit_scaled_confidence(
    probs: ArrayLike, labels: ArrayLike, *, floor: float = 1e-45
) -> NDArray[np.float64]:
    """LiRA's ``phi = log p_y - log sum_{y' != y} p_y'`` from predicted probabilities.

    Parameters
    ----------
    probs:
        Shape ``(..., n, C)`` with ``C >= 2``, entries in ``[0, 1]`` (e.g. ``(models, n, C)``).
        Rows need not sum exactly to one: ``phi`` does not change when a row is rescaled.
    labels:
        Shape ``(n,)``, integer true labels.
    floor:
        Both probability masses are clipped below at ``floor`` before the log, so
        ``phi`` is finite and bounded by ``+-log(1 / floor)`` (1e-45 as in the
        authors' code, about +-103). Prefer :func:`logit_scaled_confidence_from_logits`
        when logits are available: it needs no clipping.

    Returns
    -------
    numpy.ndarray
        Shape ``(..., n)``.
    """
    p = float_array(probs, "probs", ndim=(2, 3, 4))
    in_unit_interval(p, "probs")
    if p.shape[-1] < 2:
        raise ProbeInputError(f"probs must have at least 2 classes in its last axis, got shape {p.shape}.")
    lab = _labels_for(labels, p.shape[-2], p.shape[-1])
    is_label = lab[:, None] == np.arange(p.shape[-1])[None, :]  # (n, C)
    p_y = np.where(is_label, p, 0.0).sum(axis=-1)  # (..., n)
    # Summing the other classes directly (not 1 - p_y) keeps precision when p_y is near 1.
    p_other = np.where(is_label, 0.0, p).sum(axis=-1)  # (..., n)
    return np.log(np.maximum(p_y, floor)) - np.log(np.maximum(p_other, floor))


def logit_scaled_confidence_from_logits(logits: ArrayLike, labels: ArrayLike) -> NDArray[np.float64]:
    """LiRA's ``phi`` from logits: ``z_y - logsumexp_{y' != y} z_y'`` (the softmax normaliser cancels).

    Parameters
    ----------
    logits:
        Shape ``(..., n, C)`` with ``C >= 2``, finite.
    labels:
        Shape ``(n,)``, integer true labels.

    Returns
    -------
    numpy.ndarray
        Shape ``(..., n)``.
    """
    z = float_array(logits, "logits", ndim=(2, 3, 4))
    if z.shape[-1] < 2:
        raise ProbeInputError(f"logits must have at least 2 classes in its last axis, got shape {z.shape}.")
    lab = _labels_for(labels, z.shape[-2], z.shape[-1])
    is_label = lab[:, None] == np.arange(z.shape[-1])[None, :]  # (n, C)
    z_y = np.where(is_label, z, 0.0).sum(axis=-1)
    return np.asarray(z_y - logsumexp(np.where(is_label, -np.inf, z), axis=-1))


def example_scores(
    probs: ArrayLike, labels: ArrayLike, *, floor: float = 1e-45
) -> dict[str, NDArray[np.float64]]:
    """What an audit keeps of a predictor's output on each example, shape ``(n,)`` each.

    ``loss`` is the cross-entropy ``-log max(p_y, floor)`` (Yeom et al.'s attack statistic),
    ``confidence`` the logit-scaled confidence of :func:`logit_scaled_confidence` (LiRA's),
    ``correct`` 1.0 where ``argmax p == y`` (ties go to the smallest class, as in evaluation).

    Sequences (``probs`` (n, C, L), ``labels`` (n, L): a window of next-character predictions)
    get each statistic averaged over the window's positions: the mean per-character loss is the
    log-perplexity per character, the usual membership statistic for language models.
    """
    p = float_array(probs, "probs", ndim=(2, 3))
    if p.ndim == 3:
        n, c, length = p.shape
        rows = example_scores(
            np.moveaxis(p, 1, -1).reshape(-1, c), np.asarray(labels).reshape(-1), floor=floor
        )
        return {k: v.reshape(n, length).mean(axis=1) for k, v in rows.items()}
    lab = _labels_for(labels, p.shape[0], p.shape[1])
    p_y = p[np.arange(len(lab)), lab]
    return {
        "loss": -np.log(np.maximum(p_y, floor)),
        "confidence": logit_scaled_confidence(p, lab, floor=floor),
        "correct": (p.argmax(axis=1) == lab).astype(np.float64),
    }


def _lira_inputs(
    target_scores: ArrayLike, shadow_scores: ArrayLike, shadow_in: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Validate and bring to ``target (n, A)``, ``shadow (M, n, A)``, ``in (M, n)``."""
    shadow = float_array(shadow_scores, "shadow_scores", ndim=(2, 3))
    target = float_array(target_scores, "target_scores", ndim=(1, 2))
    if target.shape != shadow.shape[1:]:
        raise ProbeInputError(
            f"target_scores has shape {target.shape} but shadow_scores has shape {shadow.shape}; "
            "target_scores must match shadow_scores without its first (model) axis."
        )
    if shadow_in is None:
        mask = np.zeros(shadow.shape[:2], dtype=bool)
    else:
        mask = bool_array(shadow_in, "shadow_in", ndim=2)
        if mask.shape != shadow.shape[:2]:
            raise ProbeInputError(
                f"shadow_in has shape {mask.shape} but shadow_scores has "
                f"(models, examples) = {shadow.shape[:2]}."
            )
    if shadow.ndim == 2:
        shadow, target = shadow[:, :, None], target[:, None]
    return target, shadow, mask


def _fit_gaussians(
    shadow: NDArray[np.float64],
    mask: NDArray[np.bool_],
    fixed_variance: bool,
    min_std: float,
    group: str,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-example mean ``(n, A)`` and std ``(n, A)`` (or pooled, broadcastable) of the masked models."""
    weights = mask.astype(np.float64)  # (M, n)
    count = weights.sum(axis=0)  # (n,)
    need = 1 if fixed_variance else 2
    short = count < need
    if short.any():
        hint = "" if fixed_variance else " or pass fixed_variance=True"
        raise ProbeInputError(
            f"example(s) {first_indices(short)} have fewer than {need} {group} shadow models "
            f"({int(short.sum())} in all); train more shadow models{hint}."
        )
    # einsum sums over models without materialising the (M, n, A) masked product.
    mean = np.einsum("mn,mna->na", weights, shadow) / count[:, None]  # (n, A)
    dev = shadow - mean[None]  # (M, n, A)
    sq = np.einsum("mn,mna->na", weights, dev * dev)  # (n, A)
    if fixed_variance:
        dof = (count - 1.0).sum() * shadow.shape[2]
        if dof <= 0:
            raise ProbeInputError(
                f"every example has exactly one {group} shadow model, so no variance can be pooled; "
                "train more shadow models."
            )
        std = np.full_like(mean, np.sqrt(sq.sum() / dof))
    else:
        std = np.sqrt(sq / (count[:, None] - 1.0))
    return mean, np.maximum(std, min_std)


def _gauss_logpdf(
    x: NDArray[np.float64], mean: NDArray[np.float64], std: NDArray[np.float64]
) -> NDArray[np.float64]:
    # The -log(sqrt(2 pi)) constant cancels in the likelihood ratio and is left out.
    return np.asarray(-np.log(std) - 0.5 * ((x - mean) / std) ** 2)


def lira_online(
    target_scores: ArrayLike,
    shadow_scores: ArrayLike,
    shadow_in: ArrayLike,
    *,
    fixed_variance: bool = False,
    min_std: float = 1e-8,
) -> NDArray[np.float64]:
    """Online LiRA: per-example log likelihood ratio of IN vs OUT Gaussians.

    Parameters
    ----------
    target_scores:
        The attacked model's logit-scaled confidence per example, shape ``(n,)`` or ``(n, A)``
        with ``A`` augmented queries.
    shadow_scores:
        The same statistic from ``M`` shadow models, shape ``(M, n)`` or ``(M, n, A)``.
    shadow_in:
        Shape ``(M, n)``, bool: ``shadow_in[m, i]`` is True when shadow ``m`` trained on example ``i``.
        Each example needs 2 IN and 2 OUT shadows (1 of each with ``fixed_variance``).
    fixed_variance:
        Pool one IN and one OUT variance over all examples instead of per-example variances.
    min_std:
        Lower bound on every standard deviation, so constant shadow scores do not divide by zero.

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)``, higher = more likely a member of the target's training set.
    """
    target, shadow, mask = _lira_inputs(target_scores, shadow_scores, shadow_in)
    mean_in, std_in = _fit_gaussians(shadow, mask, fixed_variance, min_std, "IN")
    mean_out, std_out = _fit_gaussians(shadow, ~mask, fixed_variance, min_std, "OUT")
    llr = _gauss_logpdf(target, mean_in, std_in) - _gauss_logpdf(target, mean_out, std_out)  # (n, A)
    return np.asarray(llr.mean(axis=1))


def lira_offline(
    target_scores: ArrayLike,
    shadow_scores: ArrayLike,
    shadow_in: ArrayLike | None = None,
    *,
    fixed_variance: bool = False,
    min_std: float = 1e-8,
) -> NDArray[np.float64]:
    """Offline LiRA: one-sided test of the target's score against the OUT shadows only.

    Parameters
    ----------
    target_scores:
        Shape ``(n,)`` or ``(n, A)``.
    shadow_scores:
        Shape ``(M, n)`` or ``(M, n, A)``.
    shadow_in:
        Shape ``(M, n)``, bool; IN entries are ignored. ``None`` means no shadow trained on
        any target example (the usual offline setting).
    fixed_variance, min_std:
        As in :func:`lira_online`, for the OUT group. Each example needs 2 OUT shadows (1 with
        ``fixed_variance``).

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)``: ``(phi - mu_out) / sigma_out`` averaged over queries; higher = member.
    """
    target, shadow, mask = _lira_inputs(target_scores, shadow_scores, shadow_in)
    mean_out, std_out = _fit_gaussians(shadow, ~mask, fixed_variance, min_std, "OUT")
    return np.asarray(((target - mean_out) / std_out).mean(axis=1))
