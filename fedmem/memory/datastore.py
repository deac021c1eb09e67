"""A client's datastore: a FAISS index over (embedding, label) pairs of its training split.

kNN-Per (Marfoq et al., ICML 2022) queries this store with the embeddings of test or
validation samples and turns the neighbours' distances and labels into p_kNN
(:func:`fedmem.memory.knn.knn_probabilities`).

Three index types are registered in :data:`INDEXES` under the config key ``memory.index``:

``flat``
    ``faiss.IndexFlatL2``: exact search, the default. A store of a few thousand vectors
    builds in about a millisecond, so stores are rebuilt rather than serialized.
``ivf``
    ``faiss.IndexIVFFlat`` trained (k-means) on the stored vectors themselves. ``nlist``
    defaults to about ``4 sqrt(n)``, capped so every list gets at least 39 training points
    (FAISS's own minimum for a meaningful k-means); ``nprobe`` lists are visited per query.
``hnsw``
    ``faiss.IndexHNSWFlat`` with ``hnsw_m`` links per node and ``ef_search`` candidates
    per query.

The approximate indexes only pay off past roughly 500k vectors (see ``benchmarks/knn.py``);
per-client stores are far smaller, so ``flat`` is the right choice for kNN-Per.

FAISS is given float32 C-contiguous arrays, converted here. FAISS's OpenMP thread count is
process-wide state: this module never changes it at import; callers use
:func:`set_faiss_threads`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedmem.registry import Registry

__all__ = [
    "INDEXES",
    "Datastore",
    "IndexBuilder",
    "IndexOptions",
    "ivf_nlist",
    "set_faiss_threads",
]

# FAISS's k-means warns below 39 training points per centroid.
MIN_POINTS_PER_LIST = 39


def set_faiss_threads(n: int) -> None:
    """Set the number of OpenMP threads FAISS uses in this process (process-wide)."""
    if n < 1:
        raise ValueError(f"the FAISS thread count must be at least 1; got {n}")
    faiss.omp_set_num_threads(int(n))


def ivf_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: ``round(4 sqrt(n))``, at most ``n // 39``, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


@dataclass(frozen=True)
class IndexOptions:
    """Knobs of the approximate indexes; ``flat`` ignores them all.

    Attributes
    ----------
    nprobe:
        IVF lists visited per query (capped at ``nlist``; ``nprobe = nlist`` is exact).
    nlist:
        IVF lists; 0 means :func:`ivf_nlist` of the store size.
    hnsw_m:
        HNSW links per node.
    ef_search:
        HNSW candidate-list size per query (FAISS uses at least k).
    """

    nprobe: int = 8
    nlist: int = 0
    hnsw_m: int = 32
    ef_search: int = 64


class IndexBuilder(Protocol):
    """Build a FAISS index holding ``vectors`` ((n, d) float32, C-contiguous, n >= 1)."""

    def __call__(self, vectors: NDArray[np.float32], options: IndexOptions) -> Any: ...


def _build_flat(vectors: NDArray[np.float32], options: IndexOptions) -> Any:
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    return index


def _build_ivf(vectors: NDArray[np.float32], options: IndexOptions) -> Any:
    n, d = vectors.shape
    nlist = options.nlist or ivf_nlist(n)
    if nlist > n:
        raise ValueError(f"an IVF index needs nlist <= the number of stored vectors ({n}); got nlist={nlist}")
    # The FAISS Python wrapper keeps a reference to the quantizer inside the IVF index.
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
    index.train(vectors)
    index.add(vectors)
    index.nprobe = min(options.nprobe, nlist)
    return index


def _build_hnsw(vectors: NDArray[np.float32], options: IndexOptions) -> Any:
    index = faiss.IndexHNSWFlat(vectors.shape[1], options.hnsw_m)
    index.hnsw.efSearch = options.ef_search
    index.add(vectors)
    return index


INDEXES: Registry[IndexBuilder] = Registry("FAISS index type", "memory.index")
INDEXES.register("flat", _build_flat)
INDEXES.register("ivf", _build_ivf)
INDEXES.register("hnsw", _build_hnsw)


def _as_vectors(x: ArrayLike, what: str) -> NDArray[np.float32]:
    """(n, d) real array -> float32 C-contiguous copy/view, or a ValueError naming ``what``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, d) array; got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must hold real numbers; got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, rejected just below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(
            f"{what} contain NaN or inf (or values too large for float32); fix the model or inputs"
        )
    return out


class Datastore:
    """Embeddings and labels of one client's training split, searchable by L2 distance.

    Parameters
    ----------
    embeddings:
        (n, d) real array, cast to float32.
    labels:
        (n,) non-negative integer labels.
    index:
        Name in :data:`INDEXES`: ``"flat"`` (exact, default), ``"ivf"`` or ``"hnsw"``.
    capacity:
        Maximum number of stored entries; 0 means unlimited. When ``n > capacity > 0`` a
        uniform random subset of ``capacity`` entries (without replacement) is kept.
    rng:
        Generator that draws that subset; required only when subsampling happens.
    nprobe, nlist, hnsw_m, ef_search:
        See :class:`IndexOptions`.

    Raises
    ------
    fedmem.errors.ConfigError
        Unknown index name (the message names ``memory.index`` and the valid choices).
    ValueError
        Mismatched shapes, NaN/inf embeddings, negative labels, bad capacity or a missing rng.
    """

    def __init__(
        self,
        embeddings: ArrayLike,
        labels: ArrayLike,
        *,
        index: str = "flat",
        capacity: int = 0,
        rng: np.random.Generator | None = None,
        nprobe: int = 8,
        nlist: int = 0,
        hnsw_m: int = 32,
        ef_search: int = 64,
    ) -> None:
        builder = INDEXES.get(index)  # fail on a bad name before any work
        vectors = _as_vectors(embeddings, "embeddings")  # (n, d)
        y = np.asarray(labels)
        n = vectors.shape[0]
        if y.shape != (n,):
            raise ValueError(
                f"labels must have shape ({n},) to match embeddings {vectors.shape}; got {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers; got dtype {y.dtype}")
        if n and y.min() < 0:
            raise ValueError("labels must be non-negative (-1 is reserved for a missing neighbour)")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 (0 = unlimited); got {capacity}")
        if min(nprobe, hnsw_m, ef_search) < 1 or nlist < 0:
            raise ValueError(
                f"nprobe, hnsw_m and ef_search must be >= 1 and nlist >= 0; "
                f"got nprobe={nprobe}, hnsw_m={hnsw_m}, ef_search={ef_search}, nlist={nlist}"
            )

        kept = np.arange(n, dtype=np.int64)
        if 0 < capacity < n:
            if rng is None:
                raise ValueError(
                    f"the datastore holds {n} entries but capacity is {capacity}: "
                    f"pass rng= (e.g. fedmem.seeding.rng(seed, 'datastore', client_id)) to draw the subset"
                )
            # Sorted so the store keeps the input order; the subset itself is uniform.
            kept = np.sort(rng.choice(n, size=capacity, replace=False)).astype(np.int64)
            vectors = np.ascontiguousarray(vectors[kept])

        self._dim = int(vectors.shape[1])
        self._indices = kept  # (n_kept,) positions in the inputs
        self._labels = y[kept].astype(np.int64)  # (n_kept,)
        self._indices.flags.writeable = False
        self._labels.flags.writeable = False
        self._index_name = index
        self._options = IndexOptions(nprobe=nprobe, nlist=nlist, hnsw_m=hnsw_m, ef_search=ef_search)
        # An empty store (a client without training data) has no index: search answers "missing".
        self._index: Any = builder(vectors, self._options) if len(kept) else None

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __repr__(self) -> str:
        return f"Datastore(n={len(self)}, dim={self._dim}, index={self._index_name!r})"

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return self._dim

    @property
    def labels(self) -> NDArray[np.int64]:
        """(n,) labels of the stored entries (read-only)."""
        return self._labels

    @property
    def indices(self) -> NDArray[np.int64]:
        """(n,) positions of the stored entries in the arrays given to the constructor (read-only)."""
        return self._indices

    @property
    def index_name(self) -> str:
        """The :data:`INDEXES` name this store was built with."""
        return self._index_name

    @property
    def options(self) -> IndexOptions:
        """The approximate-index knobs this store was built with."""
        return self._options

    def search(self, queries: ArrayLike, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The k nearest stored entries of each query.

        Parameters
        ----------
        queries:
            (m, d) real array.
        k:
            Neighbours per query, >= 1. May exceed the store size.

        Returns
        -------
        distances:
            (m, k) float32 squared L2 distances, ascending per row; ``inf`` where missing.
        labels:
            (m, k) int64 labels of the neighbours; -1 where missing (store smaller than k,
            or an approximate index found fewer than k).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1; got {k}")
        q = _as_vectors(queries, "queries")  # (m, d)
        if q.shape[1] != self._dim:
            raise ValueError(
                f"queries have dimension {q.shape[1]} but the datastore holds dimension {self._dim}"
            )
        m = q.shape[0]
        if self._index is None or m == 0:
            return np.full((m, k), np.inf, dtype=np.float32), np.full((m, k), -1, dtype=np.int64)
        dist, ids = self._index.search(q, k)  # (m, k) float32, (m, k) int64 positions in the store
        missing = ids < 0
        labels = np.where(missing, -1, self._labels[np.where(missing, 0, ids)])
        # FAISS reports missing neighbours at float32 max; inf says "none" unambiguously.
        dist = np.where(missing, np.float32(np.inf), dist).astype(np.float32, copy=False)
        return dist, labels.astype(np.int64, copy=False)
