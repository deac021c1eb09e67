"""Private kNN memory: ``exclude_self`` and ``embedding_noise`` of the datastore, against oracles."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from fedmem.config import load_config
from fedmem.errors import ConfigError
from fedmem.memory.datastore import COPY_TOLERANCE, INDEXES, Datastore, add_noise, exact_copies
from fedmem.memory.knn import knn_probabilities
from fedmem.seeding import rng
from tests.memory.test_datastore import assert_matches_oracle, brute_force

# A hand-built store in the plane. Entry 4 is an exact duplicate of entry 0 with another label.
STORED = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
LABELS = np.array([0, 1, 2, 0, 1])


def brute_force_without_copies(
    stored: NDArray[np.floating], labels: NDArray[np.int64], queries: NDArray[np.floating], k: int
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """The float64 oracle of ``brute_force`` over the entries that are not copies of each query."""
    x, q = stored.astype(np.float64), queries.astype(np.float64)
    d2 = ((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)  # (m, n)
    tol = COPY_TOLERANCE * (x.shape[1] + (q * q).sum(axis=1))  # (m,)
    dist = np.full((len(q), k), np.inf)
    lab = np.full((len(q), k), -1, dtype=np.int64)
    for i in range(len(q)):
        rest = np.flatnonzero(d2[i] > tol[i])
        d, y = brute_force(x[rest], labels[rest], q[i : i + 1], k)
        dist[i], lab[i] = d[0], y[0]
    return dist, lab


def store(index: str = "flat", **kw: object) -> Datastore:
    # ivf: one list over the 5 points (nprobe covers it), so every index type searches exactly here
    return Datastore(STORED, LABELS, index=index, exclude_self=True, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("index", sorted(INDEXES.names()))
def test_exclude_self_on_a_hand_built_store(index: str) -> None:
    queries = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    dist, lab = store(index).search(queries, 3)
    # (0, 0) is entries 0 and 4: both dropped, leaving (1, 0), (0, 2), (3, 0)
    np.testing.assert_array_equal(dist[0], [1.0, 4.0, 9.0])
    np.testing.assert_array_equal(lab[0], [1, 2, 0])
    # (1, 0) is entry 1: dropped; entries 0 and 4 tie at distance 1, then (3, 0) at 4
    np.testing.assert_array_equal(dist[1], [1.0, 1.0, 4.0])
    assert sorted(lab[1][:2]) == [0, 1] and lab[1][2] == 0
    # (0.5, 0) copies nothing: entries 0, 1, 4 at 0.25
    np.testing.assert_array_equal(dist[2], [0.25, 0.25, 0.25])
    assert sorted(lab[2]) == [0, 1, 1]

    p = knn_probabilities(dist, lab, num_classes=3, temperature=1.0)
    e3 = np.exp(-3.0)
    # each row is shifted by its nearest distance before the kernel: weights 1, e^-3, e^-8 in row 0
    np.testing.assert_allclose(p[0], np.array([np.exp(-8.0), 1.0, e3]) / (1 + e3 + np.exp(-8.0)))
    np.testing.assert_allclose(p[1], np.array([1 + e3, 1, 0]) / (2 + e3))
    np.testing.assert_allclose(p[2], [1 / 3, 2 / 3, 0])


def test_a_copy_runs_out_the_store_into_missing_neighbours() -> None:
    # (0, 0) has 3 other entries; asking for 5 leaves two missing neighbours, not its copies
    dist, lab = store().search(np.zeros((1, 2)), 5)
    np.testing.assert_array_equal(lab[0], [1, 2, 0, -1, -1])
    assert np.isinf(dist[0, 3:]).all()


@pytest.mark.parametrize("index", sorted(INDEXES.names()))
def test_exclude_self_matches_the_brute_force_oracle(index: str) -> None:
    gen = np.random.default_rng(3)
    x = gen.normal(size=(400, 8))
    x[10:15] = x[0]  # five extra copies of entry 0: a row needs k + 6 candidates
    labels = gen.integers(0, 5, size=400)
    labels[10:15] = labels[0]  # tied copies share a label, so a tie at the k-th place cannot matter
    queries = np.concatenate([x[:40], gen.normal(size=(20, 8))])  # members, then non-members
    # nprobe = nlist and a wide HNSW beam make the approximate indexes exact on 400 points
    s = Datastore(x, labels, index=index, exclude_self=True, nprobe=64, ef_search=400)
    got = s.search(queries, 7)
    want = brute_force_without_copies(x, labels, queries, 7)
    assert_matches_oracle(got, want)
    assert (got[0] > 0).all()  # no row kept its own entry
    np.testing.assert_allclose(
        knn_probabilities(*got, num_classes=5, temperature=8.0),
        knn_probabilities(*want, num_classes=5, temperature=8.0),
        atol=1e-5,
    )


def test_an_exact_copy_is_dropped_and_a_near_neighbour_kept() -> None:
    base = np.array([0.3, -1.2, 2.0, 0.7])
    near = base + np.array([1e-3, 0.0, 0.0, 0.0])  # squared distance 1e-6, far above the tolerance
    far = base + 1.0
    s = Datastore(np.stack([base, near, far]), np.array([0, 1, 2]), exclude_self=True)
    # float32 rounding of a recomputed embedding (a few ulps) still counts as a copy
    wobble = base * (1 + 3e-7)
    for query in (base, wobble):
        dist, lab = s.search(query[None, :], 2)
        np.testing.assert_array_equal(lab[0], [1, 2])
        np.testing.assert_allclose(dist[0, 0], 1e-6, rtol=1e-3)
    # the tolerance: 1e-9 * (d + |q|^2) on squared L2
    tol = COPY_TOLERANCE * (4 + float(base @ base))
    ids = np.array([[0, 1, 2, -1]])
    e0 = np.array([1.0, 0.0, 0.0, 0.0])
    rows = [base, base + np.sqrt(0.9 * tol) * e0, base + np.sqrt(1.1 * tol) * e0, base]
    candidates: NDArray[np.float32] = np.stack(rows).astype(np.float32)
    q: NDArray[np.float32] = base[None, :].astype(np.float32)
    got = exact_copies(candidates, q, ids)
    want = ((candidates.astype(np.float64) - q) ** 2).sum(axis=1) <= tol
    np.testing.assert_array_equal(got[0], want & (ids[0] >= 0))
    # inside, just inside, just outside the tolerance; a missing candidate is never a copy
    np.testing.assert_array_equal(got[0], [True, True, False, False])


def test_without_copies_in_the_queries_exclude_self_changes_nothing() -> None:
    gen = np.random.default_rng(5)
    x, labels, queries = gen.normal(size=(300, 6)), gen.integers(0, 4, 300), gen.normal(size=(50, 6))
    for index in sorted(INDEXES.names()):
        plain = Datastore(x, labels, index=index).search(queries, 9)
        private = Datastore(x, labels, index=index, exclude_self=True).search(queries, 9)
        for a, b in zip(plain, private, strict=True):
            np.testing.assert_array_equal(a, b)


def test_noise_has_the_requested_std_and_is_seeded() -> None:
    zeros = np.zeros((2000, 50), dtype=np.float32)
    noise = add_noise(zeros, 0.3, rng(0, "memory-noise", 0))
    assert noise.dtype == np.float32 and noise.shape == zeros.shape
    # 100k draws: the sample std's standard error is 0.3 / sqrt(2e5) = 6.7e-4, the mean's 9.5e-4;
    # the tolerances below are > 10 standard errors, so a correct draw fails with negligible odds
    assert abs(float(noise.std()) - 0.3) < 0.01
    assert abs(float(noise.mean())) < 0.01
    np.testing.assert_array_equal(noise, add_noise(zeros, 0.3, rng(0, "memory-noise", 0)))
    other = add_noise(zeros, 0.3, rng(0, "memory-noise", 1))
    assert not np.array_equal(noise, other)
    assert abs(float(np.corrcoef(noise.ravel(), other.ravel())[0, 1])) < 0.02  # independent clients
    same = rng(0, "memory-noise", 0)
    assert add_noise(zeros, 0.0, same) is zeros  # std 0 draws nothing
    assert np.array_equal(same.random(3), rng(0, "memory-noise", 0).random(3))


def test_a_noisy_store_searches_the_noised_embeddings_also_under_a_capacity() -> None:
    gen = np.random.default_rng(7)
    x, labels, queries = gen.normal(size=(200, 6)), gen.integers(0, 4, 200), gen.normal(size=(30, 6))
    noised = add_noise(x.astype(np.float32), 0.5, rng(1, "memory-noise", 2))
    noisy = Datastore(x, labels, embedding_noise=0.5, noise_rng=rng(1, "memory-noise", 2))
    for a, b in zip(noisy.search(queries, 5), Datastore(noised, labels).search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    # the subset is drawn after the noise: each kept entry carries its own row of the full draw
    noise_rng = rng(1, "memory-noise", 2)
    capped = Datastore(
        x, labels, capacity=50, rng=rng(1, "datastore", 2), embedding_noise=0.5, noise_rng=noise_rng
    )
    reference = Datastore(noised, labels, capacity=50, rng=rng(1, "datastore", 2))
    np.testing.assert_array_equal(capped.indices, reference.indices)
    for a, b in zip(capped.search(queries, 5), reference.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)


def test_exclude_self_judges_copies_before_the_noise_and_composes_with_capacity() -> None:
    gen = np.random.default_rng(11)
    x, labels = gen.normal(size=(120, 5)), gen.integers(0, 3, 120)
    s = Datastore(
        x,
        labels,
        capacity=60,
        rng=rng(0, "datastore", 0),
        exclude_self=True,
        embedding_noise=0.05,
        noise_rng=rng(0, "memory-noise", 0),
    )
    assert (s.exclude_self, s.embedding_noise, len(s)) == (True, 0.05, 60)
    kept = s.indices
    noised = add_noise(x.astype(np.float32), 0.05, rng(0, "memory-noise", 0))[kept]
    # oracle: brute force over the kept noisy entries, minus the entry whose clean embedding is the query
    queries = x[kept[:20]]
    for i, q in enumerate(queries):
        rest = np.delete(np.arange(60), i)
        want = brute_force(noised[rest], labels[kept][rest], q[None, :], 4)
        got = s.search(q[None, :], 4)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        np.testing.assert_array_equal(got[1], want[1])


def test_bad_values_are_refused_with_a_sentence() -> None:
    with pytest.raises(ConfigError, match=r"memory\.embedding_noise must be a standard deviation >= 0"):
        load_config("default", ["memory.embedding_noise=-0.1"])
    with pytest.raises(ConfigError, match=r"memory\.embedding_noise must be a finite number"):
        load_config("default", ["memory.embedding_noise=nan"])
    with pytest.raises(ConfigError, match=r"memory\.exclude_self must be"):
        load_config("default", ["memory.exclude_self=1"])
    x, y = np.zeros((3, 2)), np.zeros(3, dtype=np.int64)
    with pytest.raises(ValueError, match="embedding_noise must be a finite standard deviation >= 0"):
        Datastore(x, y, embedding_noise=-1.0, noise_rng=rng(0))
    with pytest.raises(ValueError, match="needs noise_rng="):
        Datastore(x, y, embedding_noise=0.1)


def test_default_config_leaves_the_memory_unprotected() -> None:
    m = load_config("default", []).memory
    assert (m.exclude_self, m.embedding_noise) == (False, 0.0)
