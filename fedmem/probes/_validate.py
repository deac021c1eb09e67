"""Input checks shared by every probe.

Convention: a bad argument raises :class:`ProbeInputError`, which is both a
:class:`~fedmem.errors.FedmemError` (the CLI prints its one sentence) and a
:class:`ValueError` (what numpy users expect from a bad array). Each message
names the argument and says what to change.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedmem.errors import FedmemError


class ProbeInputError(FedmemError, ValueError):
    """An array given to a probe has the wrong shape, dtype or values."""


def float_array(
    x: ArrayLike, name: str, *, ndim: int | tuple[int, ...], finite: bool = True
) -> NDArray[np.float64]:
    """``x`` as a float64 array of the given rank, without NaN (and without inf if ``finite``)."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProbeInputError(f"{name} must be an array of numbers.") from None
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if arr.ndim not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ProbeInputError(f"{name} must be {want}-dimensional, got shape {arr.shape}.")
    if np.isnan(arr).any():
        raise ProbeInputError(f"{name} contains NaN; drop or impute those entries first.")
    if finite and np.isinf(arr).any():
        raise ProbeInputError(f"{name} contains inf; this probe needs finite values.")
    return arr


def bool_array(x: ArrayLike, name: str, *, ndim: int) -> NDArray[np.bool_]:
    """``x`` as a boolean array of rank ``ndim``; integer 0/1 arrays are refused, not guessed at."""
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise ProbeInputError(f"{name} must have dtype bool, got {arr.dtype}; convert it with .astype(bool).")
    if arr.ndim != ndim:
        raise ProbeInputError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}.")
    return arr


def same_shape(a: NDArray[np.generic], a_name: str, b: NDArray[np.generic], b_name: str) -> None:
    """Raise unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ProbeInputError(
            f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}; they must match."
        )


def in_unit_interval(x: NDArray[np.float64], name: str) -> None:
    """Raise unless every entry of ``x`` lies in [0, 1]."""
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ProbeInputError(f"{name} must lie in [0, 1] (correctness or probabilities).")


def first_indices(mask: NDArray[np.bool_], index: NDArray[np.intp] | None = None, limit: int = 5) -> str:
    """The first few flat indices where ``mask`` holds (mapped through ``index``), for error messages."""
    idx = np.flatnonzero(mask)
    if index is not None:
        idx = index[idx]
    shown = ", ".join(str(i) for i in idx[:limit])
    return shown + (", ..." if idx.size > limit else "")
