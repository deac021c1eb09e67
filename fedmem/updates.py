"""Pure numerics on named arrays: averaging (weighted, median, trimmed), merging, deltas, clipping, noise.

``Weights`` is one state dict as numpy arrays; ``Arrays`` maps names to state
dicts (``"model"``, SCAFFOLD's ``"c"``, IFCA's ``"cluster/0"``...). Everything
here is a pure function, tested by hand in ``tests/test_updates.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

Weights = dict[str, np.ndarray]
Arrays = dict[str, Weights]
# (state dicts, example counts) -> their combination: weighted_average, or a robust rule
Averager = Callable[[Sequence[Mapping[str, np.ndarray]], Sequence[float]], Weights]
AGGREGATES = ("mean", "median", "trimmed_mean")  # update.aggregate's choices


def is_float(a: np.ndarray) -> bool:
    """Floating arrays are averaged, clipped and noised; integer buffers (BatchNorm's counter) are not."""
    return bool(np.issubdtype(a.dtype, np.floating))


def weighted_average(weights: Sequence[Mapping[str, np.ndarray]], counts: Sequence[float]) -> Weights:
    """Average state dicts weighted by ``counts``, accumulating in float64.

    Floating arrays are averaged; integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are taken from the first entry, since their mean
    has no meaning.
    """
    if not weights:
        raise ValueError("weighted_average needs at least one state dict")
    if len(weights) != len(counts):
        raise ValueError(f"{len(weights)} state dicts but {len(counts)} counts")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total count")
    out: Weights = {}
    for key, first in weights[0].items():
        if not is_float(first):
            out[key] = first.copy()
            continue
        acc = np.zeros(first.shape, np.float64)
        for w, c in zip(weights, counts, strict=True):
            acc += w[key].astype(np.float64) * (c / total)
        out[key] = acc.astype(first.dtype)
    return out


def _coordinatewise(
    weights: Sequence[Mapping[str, np.ndarray]], reduce: Callable[[np.ndarray], np.ndarray]
) -> Weights:
    """Apply ``reduce`` to each floating key's stack (n, ...) in float64; integer buffers from the first."""
    if not weights:
        raise ValueError("a coordinate-wise aggregate needs at least one state dict")
    out: Weights = {}
    for key, first in weights[0].items():
        if not is_float(first):
            out[key] = first.copy()
            continue
        stack = np.stack([w[key].astype(np.float64) for w in weights])  # (n, *shape)
        out[key] = reduce(stack).astype(first.dtype)
    return out


def coordinate_median(weights: Sequence[Mapping[str, np.ndarray]]) -> Weights:
    """The coordinate-wise median of state dicts, unweighted (Yin, Chen, Kannan and Bartlett,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).

    An even number of entries gives the mean of the two middle values, in float64. Integer
    buffers are taken from the first entry, as in :func:`weighted_average`.
    """
    return _coordinatewise(weights, lambda stack: np.median(stack, axis=0))


def trimmed_mean(weights: Sequence[Mapping[str, np.ndarray]], trim_fraction: float) -> Weights:
    """The coordinate-wise trimmed mean of state dicts, unweighted (Yin et al., ICML 2018).

    For each coordinate the ``floor(trim_fraction * n)`` smallest and as many largest of the
    ``n`` values are dropped and the rest averaged in float64; ``trim_fraction = 0`` is the plain
    unweighted mean. Integer buffers are taken from the first entry.
    """
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    n = len(weights)
    cut = int(np.floor(trim_fraction * n))  # 2 * cut < n: at least one value is kept

    def reduce(stack: np.ndarray) -> np.ndarray:
        return np.mean(np.sort(stack, axis=0)[cut : n - cut], axis=0)

    return _coordinatewise(weights, reduce)


def aggregate_uploads(
    weights: Sequence[Mapping[str, np.ndarray]],
    counts: Sequence[float],
    rule: str = "mean",
    trim_fraction: float = 0.0,
) -> Weights:
    """Combine client uploads by ``update.aggregate``'s ``rule`` (one of :data:`AGGREGATES`).

    ``"mean"`` is :func:`weighted_average` with the example ``counts``; ``"median"`` and
    ``"trimmed_mean"`` ignore the counts (the robust rules of Yin et al. are unweighted).
    """
    if rule == "mean":
        return weighted_average(weights, counts)
    if len(weights) != len(counts):
        raise ValueError(f"{len(weights)} state dicts but {len(counts)} counts")
    if rule == "median":
        return coordinate_median(weights)
    if rule == "trimmed_mean":
        return trimmed_mean(weights, trim_fraction)
    raise ValueError(f"unknown aggregate {rule!r}; valid choices: {', '.join(AGGREGATES)}")


def merge_average(
    state: Mapping[str, Weights],
    uploads: Sequence[tuple[Arrays, float]],
    average: Averager = weighted_average,
) -> Arrays:
    """FedAvg over named arrays: each uploaded name is averaged over the clients that uploaded it.

    Parameters
    ----------
    state:
        The current server state; names and keys nobody uploaded are kept as they are.
    uploads:
        (arrays, weight) per client. A client may upload a subset of a name's keys (FedRep's
        body); each name must carry the same keys from every client that sends it.
    average:
        How one name's uploads are combined: the example-weighted mean, or a robust rule
        (:meth:`fedmem.strategy.Strategy.average` applies ``update.aggregate``).
    """
    out: Arrays = {name: dict(weights) for name, weights in state.items()}
    names = sorted({name for arrays, _ in uploads for name in arrays})
    for name in names:
        sent = [(arrays[name], w) for arrays, w in uploads if name in arrays]
        keys = set(sent[0][0])
        if any(set(s) != keys for s, _ in sent):
            raise ValueError(f"clients uploaded different keys under {name!r}")
        avg = average([s for s, _ in sent], [w for _, w in sent])
        out[name] = {**out.get(name, {}), **avg}
    return out


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Weights:
    """``a - b`` key by key over ``a``'s floating keys, in float64."""
    return {k: a[k].astype(np.float64) - b[k].astype(np.float64) for k in a if is_float(a[k])}


def global_norm(deltas: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The L2 norm of all arrays of all the given state dicts taken as one vector."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for d in deltas for v in d.values()))
    )


def clip_update(uploaded: Arrays, received: Mapping[str, Weights], max_norm: float) -> tuple[Arrays, float]:
    """Scale a client's update to an L2 norm of at most ``max_norm``.

    The update is ``uploaded - received`` over every floating key the client uploads under a
    name it received, taken jointly as one vector; other names travel unchanged, and so does an
    update within the bound. Returns the clipped upload and the update's norm before clipping.
    """
    names = [n for n in uploaded if n in received]
    deltas = {n: subtract(uploaded[n], received[n]) for n in names}
    norm = global_norm(list(deltas.values()))
    out: Arrays = {n: dict(w) for n, w in uploaded.items()}
    if norm <= max_norm:  # within the bound: the upload as it is, bit for bit (no float64 round trip)
        return out, norm
    scale = max_norm / norm
    for n, delta in deltas.items():
        for k, d in delta.items():
            out[n][k] = (received[n][k].astype(np.float64) + scale * d).astype(uploaded[n][k].dtype)
    return out, norm


def add_noise(
    state: Mapping[str, Weights], keys: Mapping[str, Sequence[str]], std: float, rng: np.random.Generator
) -> Arrays:
    """Add N(0, std^2) to ``state[name][key]`` for every (name, key) in ``keys``, in sorted order."""
    out: Arrays = {name: dict(w) for name, w in state.items()}
    for name in sorted(keys):
        for key in sorted(keys[name]):
            a = out[name][key]
            out[name][key] = (a.astype(np.float64) + rng.normal(0.0, std, a.shape)).astype(a.dtype)
    return out
