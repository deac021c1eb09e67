"""Tests of the FAISS datastore against a numpy brute-force oracle."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from numpy.typing import NDArray

from fedmem.errors import ConfigError
from fedmem.memory.datastore import INDEXES, Datastore, ivf_nlist, set_faiss_threads


def brute_force(
    stored: NDArray[np.floating], labels: NDArray[np.int64], queries: NDArray[np.floating], k: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Exact kNN in float64: (m, k) squared distances (inf pad) and labels (-1 pad)."""
    x = stored.astype(np.float64)
    q = queries.astype(np.float64)
    d2 = ((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)  # (m, n)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]  # (m, min(k, n))
    dist = np.full((len(q), k), np.inf)
    lab = np.full((len(q), k), -1, dtype=np.int64)
    width = order.shape[1]
    dist[:, :width] = np.take_along_axis(d2, order, axis=1)
    lab[:, :width] = labels[order]
    return dist, lab


def untied(dist: NDArray[np.float64], rtol: float = 1e-4) -> NDArray[np.bool_]:
    """(m, k) mask of neighbours whose label order is well defined.

    A neighbour qualifies if its distance differs from both row neighbours by > rtol
    (float32 FAISS and the float64 oracle may order near-ties differently), or if it is
    missing (inf), where the label must be -1 in both.
    """
    scale = np.maximum(np.abs(dist), 1.0)
    with np.errstate(invalid="ignore"):  # inf - inf between two missing neighbours
        gap = np.diff(dist, axis=1) > rtol * scale[:, :-1]  # (m, k-1): gap to the next neighbour
    ok = np.ones_like(dist, dtype=bool)
    ok[:, 1:] &= gap
    ok[:, :-1] &= gap
    return ok | np.isinf(dist)


def data(n: int, d: int, m: int, seed: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    gen = np.random.default_rng(seed)
    return gen.normal(size=(n, d)), gen.normal(size=(m, d))


def assert_matches_oracle(
    got: tuple[NDArray[np.float32], NDArray[np.int64]], want: tuple[NDArray[np.float64], NDArray[np.int64]]
) -> None:
    (gd, gl), (wd, wl) = got, want
    assert gd.dtype == np.float32
    assert gl.dtype == np.int64
    assert gd.shape == wd.shape == gl.shape
    np.testing.assert_allclose(gd, wd, rtol=1e-4, atol=1e-4)
    mask = untied(wd)
    assert mask.mean() > 0.9  # the comparison below is not vacuous
    np.testing.assert_array_equal(gl[mask], wl[mask])


# ---------------------------------------------------------------- exact search


def test_flat_matches_brute_force_ids() -> None:
    # Labels = row numbers, so label equality checks the neighbour identities themselves.
    x, q = data(2000, 24, 300, seed=0)
    ids = np.arange(len(x))
    store = Datastore(x, ids)
    assert_matches_oracle(store.search(q, 10), brute_force(x, ids, q, 10))


def test_flat_matches_brute_force_class_labels() -> None:
    x, q = data(500, 8, 100, seed=1)
    y = np.random.default_rng(1).integers(0, 5, size=len(x))
    store = Datastore(x, y)
    assert_matches_oracle(store.search(q, 7), brute_force(x, y, q, 7))


def test_k_larger_than_store_pads_missing() -> None:
    x, q = data(7, 4, 5, seed=2)
    ids = np.arange(7)
    dist, lab = Datastore(x, ids).search(q, 10)
    assert (lab[:, 7:] == -1).all()
    assert np.isinf(dist[:, 7:]).all()
    assert_matches_oracle((dist, lab), brute_force(x, ids, q, 10))


def test_empty_store_returns_only_missing() -> None:
    store = Datastore(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    dist, lab = store.search(np.ones((2, 3)), 4)
    assert len(store) == 0
    assert store.dim == 3
    assert (lab == -1).all()
    assert np.isinf(dist).all()


def test_accepts_non_contiguous_float64_and_int_inputs() -> None:
    x, q = data(300, 6, 40, seed=3)
    ids = np.arange(300, dtype=np.int32)
    x_f = np.asfortranarray(x)  # FAISS needs C order: converted inside
    q_strided = np.repeat(q, 2, axis=0)[::2]  # a strided view
    assert_matches_oracle(
        Datastore(x_f, ids).search(q_strided, 5), brute_force(x, ids.astype(np.int64), q, 5)
    )
    integer_store = Datastore(np.arange(12).reshape(4, 3), np.arange(4))
    _, lab = integer_store.search(np.array([[9, 10, 11]]), 1)
    assert lab.tolist() == [[3]]


# ---------------------------------------------------------------- capacity


def test_capacity_keeps_a_seeded_subset() -> None:
    x, q = data(1000, 8, 50, seed=4)
    ids = np.arange(1000)
    store = Datastore(x, ids, capacity=100, rng=np.random.default_rng(7))
    assert len(store) == 100
    kept = store.indices
    assert len(np.unique(kept)) == 100
    assert (np.diff(kept) > 0).all()
    np.testing.assert_array_equal(store.labels, ids[kept])
    got = store.search(q, 5)
    assert np.isin(got[1], kept).all()  # results come only from kept points
    assert_matches_oracle(got, brute_force(x[kept], ids[kept], q, 5))

    again = Datastore(x, ids, capacity=100, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(again.indices, kept)
    other = Datastore(x, ids, capacity=100, rng=np.random.default_rng(8))
    assert not np.array_equal(other.indices, kept)


def test_capacity_subset_is_uniform() -> None:
    # Each of 10 entries is kept with probability 3/10; over 1000 draws the count per entry
    # is Binomial(1000, 0.3): mean 300, sd 14.5. Six sd is a false alarm rate of ~1e-8.
    x = np.random.default_rng(5).normal(size=(10, 2))
    gen = np.random.default_rng(6)
    counts = np.zeros(10)
    for _ in range(1000):
        counts[Datastore(x, np.arange(10), capacity=3, rng=gen).indices] += 1
    assert np.abs(counts - 300).max() < 6 * 14.5


def test_capacity_at_or_above_size_keeps_everything_without_rng() -> None:
    x, _ = data(50, 4, 1, seed=7)
    for capacity in (0, 50, 80):
        store = Datastore(x, np.arange(50), capacity=capacity)
        assert len(store) == 50
        np.testing.assert_array_equal(store.indices, np.arange(50))


def test_capacity_without_rng_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rng"):
        Datastore(np.zeros((5, 2)), np.arange(5), capacity=3)


# ---------------------------------------------------------------- approximate indexes


def test_ivf_nlist_rule() -> None:
    assert ivf_nlist(50_000) == round(4 * 50_000**0.5) == 894
    assert ivf_nlist(3000) == 3000 // 39 == 76  # capped: >= 39 points per list
    assert ivf_nlist(100) == 2
    assert ivf_nlist(10) == 1
    assert ivf_nlist(0) == 1


def test_ivf_with_all_lists_probed_is_exact() -> None:
    x, q = data(3000, 16, 200, seed=8)
    ids = np.arange(3000)
    nlist = ivf_nlist(3000)
    store = Datastore(x, ids, index="ivf", nprobe=nlist)
    assert store.index_name == "ivf"
    assert_matches_oracle(store.search(q, 10), Datastore(x, ids).search(q, 10))  # type: ignore[arg-type]
    assert_matches_oracle(store.search(q, 10), brute_force(x, ids, q, 10))


def test_ivf_with_one_probe_is_approximate_but_valid() -> None:
    x, q = data(3000, 16, 200, seed=9)
    dist, lab = Datastore(x, np.arange(3000), index="ivf", nprobe=1, nlist=50).search(q, 10)
    exact = brute_force(x, np.arange(3000), q, 10)[1]
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(lab, exact, strict=True)])
    assert 0.05 < recall < 0.99  # it really visits only part of the store
    valid = lab >= 0
    assert (np.diff(np.where(valid, dist, np.inf), axis=1) >= 0).all()


def test_ivf_rejects_more_lists_than_points() -> None:
    with pytest.raises(ValueError, match="nlist"):
        Datastore(np.zeros((5, 2)), np.arange(5), index="ivf", nlist=6)


def test_hnsw_recall_at_10() -> None:
    x, q = data(4000, 32, 200, seed=10)
    ids = np.arange(4000)
    _, lab = Datastore(x, ids, index="hnsw", hnsw_m=32, ef_search=64).search(q, 10)
    exact = brute_force(x, ids, q, 10)[1]
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(lab, exact, strict=True)])
    assert recall >= 0.95


# ---------------------------------------------------------------- errors and plumbing


def test_unknown_index_names_key_and_choices() -> None:
    with pytest.raises(ConfigError) as info:
        Datastore(np.zeros((3, 2)), np.arange(3), index="annoy")
    message = str(info.value)
    assert "memory.index" in message
    assert "'annoy'" in message
    assert "valid choices: flat, hnsw, ivf" in message
    assert INDEXES.names() == ["flat", "hnsw", "ivf"]


@pytest.mark.parametrize(
    ("embeddings", "labels", "match"),
    [
        (np.zeros((3, 2)), np.arange(4), r"labels must have shape \(3,\)"),
        (np.zeros((3, 2)), np.arange(3).reshape(3, 1), r"labels must have shape \(3,\)"),
        (np.zeros(3), np.arange(3), "2-D"),
        (np.array([[0.0, np.nan]]), np.arange(1), "NaN"),
        (np.array([[0.0, np.inf]]), np.arange(1), "NaN or inf"),
        (np.array([[0.0, 1e39]]), np.arange(1), "float32"),
        (np.array([["a", "b"]]), np.arange(1), "real numbers"),
        (np.zeros((2, 2)), np.array([0.0, 1.0]), "integers"),
        (np.zeros((2, 2)), np.array([0, -1]), "non-negative"),
    ],
)
def test_bad_construction_raises(
    embeddings: NDArray[np.float64], labels: NDArray[np.int64], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Datastore(embeddings, labels)


@pytest.mark.parametrize(
    "kwargs", [{"capacity": -1}, {"nprobe": 0}, {"hnsw_m": 0}, {"ef_search": 0}, {"nlist": -1}]
)
def test_bad_options_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Datastore(np.zeros((3, 2)), np.arange(3), **kwargs)  # type: ignore[arg-type]


def test_bad_queries_raise() -> None:
    store = Datastore(np.zeros((3, 2)), np.arange(3))
    with pytest.raises(ValueError, match="dimension 3"):
        store.search(np.zeros((1, 3)), 1)
    with pytest.raises(ValueError, match="NaN"):
        store.search(np.array([[np.nan, 0.0]]), 1)
    with pytest.raises(ValueError, match="k must be"):
        store.search(np.zeros((1, 2)), 0)


def test_labels_are_read_only_and_empty_queries_work() -> None:
    store = Datastore(np.eye(3), np.array([2, 0, 1]))
    with pytest.raises(ValueError, match="read-only"):
        store.labels[0] = 5
    dist, lab = store.search(np.zeros((0, 3)), 2)
    assert dist.shape == lab.shape == (0, 2)
    assert repr(store) == "Datastore(n=3, dim=3, index='flat')"


def test_set_faiss_threads() -> None:
    before = faiss.omp_get_max_threads()
    try:
        set_faiss_threads(1)
        assert faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        set_faiss_threads(0)
