"""Server optimizers on named weights: FedAvgM, FedAdam and FedYogi as pure functions.

The server treats the pseudo-gradient ``delta = weighted average of the client models - x``
as a gradient step and feeds it to an optimizer (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2, without bias correction; FedAvgM: Hsu, Qi and Brown,
"Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019). Moments are kept per floating key in the dtype of the weights and
computed in float64. Integer buffers (BatchNorm's ``num_batches_tracked``) are not optimized:
the new model takes them from the average.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedmem.updates import Weights, is_float

SecondMoment = Callable[[np.ndarray, np.ndarray, float], np.ndarray]

__all__ = [
    "SecondMoment",
    "adam_second_moment",
    "adaptive_step",
    "momentum_step",
    "pseudo_gradient",
    "yogi_second_moment",
    "zeros_like",
]


def zeros_like(x: Mapping[str, np.ndarray], value: float = 0.0) -> Weights:
    """A moment buffer: ``value`` for every floating key of ``x``, in its dtype and shape."""
    return {k: np.full(a.shape, value, a.dtype) for k, a in x.items() if is_float(a)}


def pseudo_gradient(x: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray]) -> Weights:
    """``average - x`` over the floating keys of ``x``, in float64."""
    return {k: average[k].astype(np.float64) - a.astype(np.float64) for k, a in x.items() if is_float(a)}


def _apply(x: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray], step: Weights) -> Weights:
    """``x + step`` on floating keys (cast back to their dtype); integer buffers from ``average``."""
    return {
        k: (a.astype(np.float64) + step[k]).astype(a.dtype) if is_float(a) else average[k].copy()
        for k, a in x.items()
    }


def momentum_step(
    x: Mapping[str, np.ndarray],
    average: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray],
    *,
    server_lr: float,
    momentum: float,
) -> tuple[Weights, Weights]:
    """FedAvgM: ``m <- momentum * m + delta``, ``x <- x + server_lr * m``; returns (x, m)."""
    delta = pseudo_gradient(x, average)
    m64 = {k: momentum * m[k].astype(np.float64) + d for k, d in delta.items()}
    new_x = _apply(x, average, {k: server_lr * v for k, v in m64.items()})
    return new_x, {k: v.astype(m[k].dtype) for k, v in m64.items()}


def adam_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """Adam's ``v <- beta2 * v + (1 - beta2) * delta^2`` (float64)."""
    return beta2 * v + (1.0 - beta2) * np.square(delta)


def yogi_second_moment(v: np.ndarray, delta: np.ndarray, beta2: float) -> np.ndarray:
    """Yogi's ``v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)`` (float64; sign(0) = 0).

    Unlike Adam, ``v`` moves by at most ``(1 - beta2) * delta^2`` per round towards ``delta^2``,
    so a few large pseudo-gradients do not wipe out the memory of small ones.
    """
    d2 = np.square(delta)
    return v - (1.0 - beta2) * d2 * np.sign(v - d2)


def adaptive_step(
    x: Mapping[str, np.ndarray],
    average: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    *,
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    second_moment: SecondMoment,
) -> tuple[Weights, Weights, Weights]:
    """FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2); returns (x, m, v).

    ``m <- beta1 * m + (1 - beta1) * delta``, ``v <- second_moment(v, delta, beta2)``,
    ``x <- x + server_lr * m / (sqrt(v) + tau)``, coordinate-wise, no bias correction.
    """
    delta = pseudo_gradient(x, average)
    m64 = {k: beta1 * m[k].astype(np.float64) + (1.0 - beta1) * d for k, d in delta.items()}
    v64 = {k: second_moment(v[k].astype(np.float64), d, beta2) for k, d in delta.items()}
    step = {k: server_lr * m64[k] / (np.sqrt(v64[k]) + tau) for k in delta}
    new_x = _apply(x, average, step)
    return (
        new_x,
        {k: a.astype(m[k].dtype) for k, a in m64.items()},
        {k: a.astype(v[k].dtype) for k, a in v64.items()},
    )
