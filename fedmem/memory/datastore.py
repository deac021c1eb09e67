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

Private memory
--------------
A query that is itself stored finds its own entry at distance ~0, whose label then dominates
p_kNN: a membership signal. Two options of the store limit it, for every index type, so that
personalization and the leakage audit (which both only search) see the same store:

``exclude_self``
    :meth:`Datastore.search` drops stored entries that are exact copies of the query (see
    :func:`exact_copies`) and returns the k nearest of the rest, so a member is scored as a
    non-member would be. Copies are judged on the embeddings as given, before any noise.
``embedding_noise``
    :func:`add_noise` adds N(0, std^2) to every coordinate of every stored embedding once, when
    the store is built (before the capacity subset is drawn, so an entry's noise does not
    depend on which others are kept). Queries are not noised.

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
    "COPY_TOLERANCE",
    "INDEXES",
    "Datastore",
    "IndexBuilder",
    "IndexOptions",
    "add_noise",
    "exact_copies",
    "ivf_nlist",
    "set_faiss_threads",
]

# FAISS's k-means warns below 39 training points per centroid.
MIN_POINTS_PER_LIST = 39

# A stored entry is a copy of query q when ||z - q||^2 <= COPY_TOLERANCE * (d + ||q||^2).
# The same input embedded twice in float32 (different batch sizes, BLAS kernels) differs by a
# few ulps, so a copy is rarely at exactly 0: measured <= 5e-13 * ||q||^2 on the default CNN.
# Distinct images lie far beyond: on the default scenario after 2 rounds ||q||^2 ~ 100 (the
# tolerance is then 1.6e-7) and the 1st percentile of nearest-neighbour distances is 0.24. The
# ||q||^2 term scales the tolerance with the embeddings' size, as float32 rounding does; the d
# term is a floor (RMS per-coordinate gap ~3e-5) for embeddings near 0.
COPY_TOLERANCE = 1e-9
# (queries x candidates) rows of float64 differences per block in exact_copies: ~32 MB at d = 64.
_COPY_BLOCK_ROWS = 1 << 16


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


def add_noise(vectors: NDArray[np.float32], std: float, rng: np.random.Generator) -> NDArray[np.float32]:
    """``vectors`` + independent N(0, std^2) noise on every coordinate, drawn in float32 from ``rng``.

    Parameters
    ----------
    vectors:
        (n, d) float32 embeddings.
    std:
        Standard deviation >= 0; 0 returns ``vectors`` itself without drawing.
    rng:
        The generator; fedmem seeds it with ``rng(seed, "memory-noise", client)``.

    Returns
    -------
    (n, d) float32, C-contiguous.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"the embedding noise must be a finite standard deviation >= 0; got {std}")
    if std == 0:
        return vectors
    noise = rng.standard_normal(vectors.shape, dtype=np.float32)  # (n, d)
    return np.ascontiguousarray(vectors + np.float32(std) * noise, dtype=np.float32)


def exact_copies(
    stored: NDArray[np.float32], queries: NDArray[np.float32], ids: NDArray[np.int64]
) -> NDArray[np.bool_]:
    """Which found neighbours are exact copies of their query.

    Parameters
    ----------
    stored:
        (n, d) float32 embeddings, indexed by ``ids``.
    queries:
        (m, d) float32 queries.
    ids:
        (m, w) positions in ``stored`` of each query's candidates; < 0 marks a missing one.

    Returns
    -------
    (m, w) bool: ``ids >= 0`` and ``||stored[id] - query||^2 <= COPY_TOLERANCE * (d + ||query||^2)``,
    the squared distance summed over float64 differences (never the ``|a|^2 + |b|^2 - 2ab``
    expansion, whose cancellation leaves copies far from 0 in float32).
    """
    m, w = ids.shape
    out = np.zeros((m, w), dtype=np.bool_)
    if m == 0 or w == 0:
        return out
    q = queries.astype(np.float64)  # (m, d)
    tol = COPY_TOLERANCE * (q.shape[1] + (q * q).sum(axis=1))  # (m,)
    safe = np.where(ids < 0, 0, ids)
    step = max(1, _COPY_BLOCK_ROWS // w)
    for a in range(0, m, step):
        diff = stored[safe[a : a + step]].astype(np.float64) - q[a : a + step, None, :]  # (b, w, d)
        out[a : a + step] = (diff * diff).sum(axis=2) <= tol[a : a + step, None]
    return out & (ids >= 0)


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
    exclude_self:
        When true, :meth:`search` never returns a stored entry that is an exact copy of the
        query (:func:`exact_copies`, on the embeddings as given, before noise). Every copy is
        dropped: a query with two identical stored inputs (duplicates in the train split,
        whatever their labels) loses both, and a test input identical to a stored one loses it
        too, so members and non-members are treated by the same rule. Keeps a second (n, d)
        float32 copy of the embeddings.
    embedding_noise:
        Standard deviation of the Gaussian noise :func:`add_noise` adds to every stored
        embedding at build time; 0 (the default) stores them as given.
    noise_rng:
        Generator of that noise; required only when ``embedding_noise > 0``.

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
        exclude_self: bool = False,
        embedding_noise: float = 0.0,
        noise_rng: np.random.Generator | None = None,
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
        if not (embedding_noise >= 0 and math.isfinite(embedding_noise)):
            raise ValueError(
                f"embedding_noise must be a finite standard deviation >= 0; got {embedding_noise}"
            )
        exact = vectors
        if embedding_noise > 0:
            if noise_rng is None:
                raise ValueError(
                    "embedding_noise > 0 needs noise_rng= "
                    "(e.g. fedmem.seeding.rng(seed, 'memory-noise', client_id)) to draw the noise"
                )
            # Drawn for all n inputs before the subset, so an entry's noise ignores the capacity.
            vectors = add_noise(vectors, embedding_noise, noise_rng)

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
            if exclude_self:
                exact = exact[kept]

        self._dim = int(vectors.shape[1])
        self._indices = kept  # (n_kept,) positions in the inputs
        self._labels = y[kept].astype(np.int64)  # (n_kept,)
        self._indices.flags.writeable = False
        self._labels.flags.writeable = False
        self._index_name = index
        self._options = IndexOptions(nprobe=nprobe, nlist=nlist, hnsw_m=hnsw_m, ef_search=ef_search)
        self._embedding_noise = float(embedding_noise)
        # The un-noised embeddings, against which search recognizes copies of a query; a copy of
        # them, as the caller's array may be this very float32 array and change later.
        self._exact: NDArray[np.float32] | None = exact.copy() if exclude_self else None
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

    @property
    def exclude_self(self) -> bool:
        """Whether :meth:`search` drops exact copies of the query."""
        return self._exact is not None

    @property
    def embedding_noise(self) -> float:
        """Standard deviation of the noise added to the stored embeddings (0 = none)."""
        return self._embedding_noise

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
            or an approximate index found fewer than k, or with ``exclude_self`` fewer than k
            entries that are not copies of the query).
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
        if self._exact is None:
            dist, ids = self._index.search(q, k)  # (m, k) float32, (m, k) int64 positions in the store
        else:
            dist, ids = self._search_without_copies(q, k)
        missing = ids < 0
        labels = np.where(missing, -1, self._labels[np.where(missing, 0, ids)])
        # FAISS reports missing neighbours at float32 max; inf says "none" unambiguously.
        dist = np.where(missing, np.float32(np.inf), dist).astype(np.float32, copy=False)
        return dist, labels.astype(np.int64, copy=False)

    def _search_without_copies(
        self, q: NDArray[np.float32], k: int
    ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """FAISS's (distances, ids), (m, k) each, of the k nearest entries that are not copies of q."""
        assert self._exact is not None
        width = k
        while True:  # widen until every row has k candidates besides its copies (or the whole store)
            dist, ids = self._index.search(q, width)  # (m, width)
            copy = exact_copies(self._exact, q, ids)  # (m, width)
            need = k + int(copy.sum(axis=1).max())
            # need <= k + n, and width grows strictly, so this ends by width = k + n at the latest.
            if need <= width:
                break
            width = need
        # Non-copies first, each group kept in FAISS's distance order; copies left in the first k
        # columns (rows that ran out of other entries) become missing neighbours.
        order = np.argsort(copy, axis=1, kind="stable")[:, :k]  # (m, k)
        ids = np.take_along_axis(ids, order, axis=1)
        ids = np.where(np.take_along_axis(copy, order, axis=1), -1, ids)
        return np.take_along_axis(dist, order, axis=1), ids
