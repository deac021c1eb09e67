"""Partitioning: exact small cases, properties, config errors, and flwr-datasets as the oracle."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from fedmem.data.partition import (
    DIRICHLET_MAX_DRAWS,
    SCHEMES,
    build_federation,
    choose_unseen,
    label_skew,
    partition_labels,
    smallest_splittable,
    split_client,
)
from fedmem.errors import ConfigError, DataError
from fedmem.seeding import rng

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

label_arrays = st.lists(st.integers(0, 5), min_size=20, max_size=300).map(
    lambda v: np.array(v, dtype=np.int64)
)
seeds = st.integers(0, 2**31 - 1)


def balanced_labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """n labels, as many of each class as possible, in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes).astype(np.int64)


def check_disjoint_and_sorted(parts: list[np.ndarray], n: int) -> np.ndarray:
    """Assert the parts are sorted int64 indices in [0, n), no index in two parts; return their union."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
        assert p.size == 0 or (p[0] >= 0 and p[-1] < n)
    union = np.sort(np.concatenate(parts))
    assert np.all(np.diff(union) > 0), "an index is given to two clients"
    return union


# ----------------------------------------------------------------- partitions


@FAST
@given(
    labels=label_arrays,
    scheme=st.sampled_from(["iid", "dirichlet"]),
    num_clients=st.integers(1, 8),
    seed=seeds,
    alpha=st.floats(0.05, 10),
)
def test_iid_and_dirichlet_cover_every_index_once(
    labels: np.ndarray, scheme: str, num_clients: int, seed: int, alpha: float
) -> None:
    try:
        parts = partition_labels(
            labels, scheme=scheme, num_clients=num_clients, seed=seed, alpha=alpha, min_size=1
        )
    except DataError:
        reject()  # a Dirichlet draw that cannot give 8 clients one of 20 examples: tested below
    assert len(parts) == num_clients
    union = check_disjoint_and_sorted(parts, len(labels))
    np.testing.assert_array_equal(union, np.arange(len(labels)))


@FAST
@given(labels=label_arrays, num_clients=st.integers(1, 12), seed=seeds)
def test_iid_sizes_differ_by_at_most_one(labels: np.ndarray, num_clients: int, seed: int) -> None:
    parts = partition_labels(labels, scheme="iid", num_clients=num_clients, seed=seed, min_size=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(labels)


@FAST
@given(labels=label_arrays, num_clients=st.integers(1, 12), k=st.integers(1, 3), seed=seeds)
def test_pathological_gives_each_client_exactly_k_classes(
    labels: np.ndarray, num_clients: int, k: int, seed: int
) -> None:
    classes = np.unique(labels)
    if k > len(classes):
        k = len(classes)
    try:
        parts = partition_labels(
            labels,
            scheme="pathological",
            num_clients=num_clients,
            seed=seed,
            classes_per_client=k,
            min_size=1,
        )
    except DataError:
        reject()  # a rare class wanted by more clients than it has examples: tested below
    union = check_disjoint_and_sorted(parts, len(labels))
    held = set()
    for p in parts:
        client_classes = set(labels[p].tolist())
        assert len(client_classes) == k
        held |= client_classes
    # Nothing is dropped but the examples of classes no client holds, and with
    # at least as many clients as classes every class is held.
    np.testing.assert_array_equal(union, np.flatnonzero(np.isin(labels, sorted(held))))
    if num_clients >= len(classes):
        np.testing.assert_array_equal(union, np.arange(len(labels)))


def test_pathological_with_fewer_clients_than_classes_drops_unheld_classes() -> None:
    labels = balanced_labels(1000, 10)
    parts = partition_labels(labels, scheme="pathological", num_clients=3, seed=0, classes_per_client=2)
    held = set(np.unique(labels[np.concatenate(parts)]).tolist())
    assert {0, 1, 2} <= held  # client i's first class is i
    assert len(held) <= 6
    assert sum(len(p) for p in parts) == 100 * len(held)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_same_seed_same_split_other_seed_other_split(scheme: str, seed: int) -> None:
    labels = balanced_labels(600, 6)
    kwargs: dict[str, Any] = {"scheme": scheme, "num_clients": 6, "alpha": 0.5, "classes_per_client": 2}

    first = partition_labels(labels, seed=seed, **kwargs)
    again = partition_labels(labels, seed=seed, **kwargs)
    other = partition_labels(labels, seed=seed + 1, **kwargs)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    labels = balanced_labels(5000, 10)
    for seed in range(5):
        skew = {
            alpha: label_skew(
                labels,
                partition_labels(labels, scheme="dirichlet", num_clients=10, seed=seed, alpha=alpha),
                10,
            )
            for alpha in (0.1, 100.0)
        }
        iid_skew = label_skew(labels, partition_labels(labels, scheme="iid", num_clients=10, seed=seed), 10)
        assert skew[0.1] > 0.5
        assert skew[100.0] < 0.1
        assert iid_skew < 0.1


def test_iid_matches_hand_computed_permutation() -> None:
    labels = np.zeros(7, dtype=np.int64)
    perm = np.random.default_rng(3).permutation(7)
    parts = partition_labels(labels, scheme="iid", num_clients=3, seed=3, min_size=1)
    # 7 = 3 + 2 + 2: the first shard takes the extra example.
    expected = [np.sort(perm[0:3]), np.sort(perm[3:5]), np.sort(perm[5:7])]
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True))


# ----------------------------------------------------------- flwr-datasets oracle


def flower() -> tuple[ModuleType, ModuleType]:
    hf_datasets = pytest.importorskip("datasets")
    partitioner = pytest.importorskip("flwr_datasets.partitioner")
    return hf_datasets, partitioner


def flower_partition(
    labels: np.ndarray, partitioner: Any, shuffle_seed: int | None = None
) -> list[np.ndarray]:
    """Partition with flwr-datasets over an HF Dataset of (label, index) and return sorted index arrays."""
    hf_datasets, _ = flower()
    dataset = hf_datasets.Dataset.from_dict({"label": labels, "index": np.arange(len(labels))})
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)  # what FederatedDataset does before partitioning
    partitioner.dataset = dataset.with_format("arrow")  # arrow: numpy per row is ~30x slower
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["index"])) for i in range(partitioner.num_partitions)
    ]


def same_or_both_fail(ours: Callable[[], list[np.ndarray]], theirs: Callable[[], list[np.ndarray]]) -> None:
    """Compare two zero-argument calls: equal partitions, or both raise."""
    try:
        expected = theirs()
    except ValueError:
        with pytest.raises(DataError):
            ours()
        return
    got = ours()
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=15, deadline=None)
@given(labels=label_arrays, num_clients=st.integers(1, 8), seed=seeds)
def test_iid_equals_flwr_datasets(labels: np.ndarray, num_clients: int, seed: int) -> None:
    _, fp = flower()
    same_or_both_fail(
        lambda: partition_labels(labels, scheme="iid", num_clients=num_clients, seed=seed, min_size=1),
        lambda: flower_partition(labels, fp.IidPartitioner(num_clients), shuffle_seed=seed),
    )


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=15, deadline=None)
@given(
    labels=label_arrays,
    num_clients=st.integers(1, 8),
    seed=seeds,
    alpha=st.floats(0.05, 10),
    min_size=st.integers(1, 10),
)
def test_dirichlet_equals_flwr_datasets(
    labels: np.ndarray, num_clients: int, seed: int, alpha: float, min_size: int
) -> None:
    _, fp = flower()
    same_or_both_fail(
        lambda: partition_labels(
            labels, scheme="dirichlet", num_clients=num_clients, seed=seed, alpha=alpha, min_size=min_size
        ),
        lambda: flower_partition(
            labels,
            fp.DirichletPartitioner(num_clients, "label", alpha, min_partition_size=min_size, seed=seed),
        ),
    )


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=15, deadline=None)
@given(labels=label_arrays, num_clients=st.integers(1, 12), k=st.integers(1, 4), seed=seeds)
def test_pathological_equals_flwr_datasets(labels: np.ndarray, num_clients: int, k: int, seed: int) -> None:
    _, fp = flower()
    k = min(k, len(np.unique(labels)))
    same_or_both_fail(
        lambda: partition_labels(
            labels,
            scheme="pathological",
            num_clients=num_clients,
            seed=seed,
            classes_per_client=k,
            min_size=1,
        ),
        lambda: flower_partition(
            labels,
            fp.PathologicalPartitioner(
                num_clients, "label", k, class_assignment_mode="first-deterministic", seed=seed
            ),
        ),
    )


def test_dirichlet_redraws_like_flwr_datasets_at_full_size() -> None:
    # 70k labels, 20 clients, alpha 0.1, min size 300: the first draws leave a
    # client short, so this also checks that redraws follow flwr-datasets'.
    _, fp = flower()
    labels = balanced_labels(70000, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = flower_partition(
            labels, fp.DirichletPartitioner(20, "label", 0.1, min_partition_size=300, seed=1)
        )
    assert any("min_partition_size" in str(w.message) for w in caught), "no redraw happened"
    got = partition_labels(labels, scheme="dirichlet", num_clients=20, seed=1, alpha=0.1, min_size=300)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"scheme": "shards"},
            "partition.scheme = 'shards'.*valid choices: dirichlet, iid, natural, pathological",
        ),
        ({"num_clients": 0}, r"partition.num_clients = 0 must be an integer between 1 and .* \(100\)"),
        ({"num_clients": 101}, r"partition.num_clients = 101 must be .* \(100\)"),
        ({"num_clients": 2.0}, "partition.num_clients = 2.0"),
        ({"alpha": 0.0}, "partition.alpha = 0.0 must be a positive number"),
        ({"alpha": -1.0}, "partition.alpha = -1.0"),
        ({"alpha": math.nan}, "partition.alpha = nan"),
        (
            {"scheme": "pathological", "classes_per_client": 0},
            r"partition.classes_per_client = 0 must be between 1 and .* \(5\)",
        ),
        (
            {"scheme": "pathological", "classes_per_client": 6},
            r"partition.classes_per_client = 6 must be between 1 and .* \(5\)",
        ),
        ({"min_size": 0}, "partition.min_size = 0 must be an integer of at least 1"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_partition_config_errors_name_the_key(overrides: dict[str, Any], expected: str) -> None:
    labels = balanced_labels(100, 5)
    kwargs: dict[str, Any] = {"scheme": "iid", "num_clients": 4, "seed": 0, "min_size": 1, **overrides}
    with pytest.raises(ConfigError, match=expected):
        partition_labels(labels, **kwargs)


def test_scheme_registry_lists_the_four_schemes() -> None:
    assert SCHEMES.names() == ["dirichlet", "iid", "natural", "pathological"]


def test_impossible_dirichlet_min_size_is_a_data_error() -> None:
    labels = balanced_labels(100, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and ours stays quiet while it redraws
        with pytest.raises(
            DataError, match=f"partition.alpha = 0.01.*partition.min_size = 8.*{DIRICHLET_MAX_DRAWS}"
        ):
            partition_labels(labels, scheme="dirichlet", num_clients=10, seed=0, alpha=0.01, min_size=8)


def test_iid_below_min_size_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"client \d+ only 9 examples, fewer than partition.min_size = 10"):
        partition_labels(balanced_labels(99, 3), scheme="iid", num_clients=10, seed=0, min_size=10)


def test_pathological_class_shared_by_more_clients_than_examples_is_a_data_error() -> None:
    labels = np.array([0] * 50 + [1], dtype=np.int64)  # class 1 has one example
    with pytest.raises(DataError, match=r"class 1 has 1 examples but .* 4 clients"):
        partition_labels(
            labels, scheme="pathological", num_clients=4, seed=0, classes_per_client=2, min_size=1
        )


def test_non_integer_labels_are_rejected() -> None:
    floats = np.zeros(10)
    with pytest.raises(DataError, match="1-d integer array"):
        partition_labels(floats, scheme="iid", num_clients=2, seed=0, min_size=1)  # type: ignore[arg-type]


# ----------------------------------------------------------- client splits


def test_split_client_exact_sizes() -> None:
    indices = np.arange(100, 110, dtype=np.int64)
    split = split_client(indices, train_fraction=0.6, val_fraction=0.2, rng=rng(0, "split", 0))
    assert (len(split.train), len(split.val), len(split.test)) == (6, 2, 2)
    # 0.29 * 100 is 28.999999999999996 in floating point; it still means 29 examples.
    split = split_client(np.arange(100), train_fraction=0.29, val_fraction=0.3, rng=rng(0))
    assert (len(split.train), len(split.val), len(split.test)) == (29, 30, 41)


@FAST
@given(
    n=st.integers(1, 200),
    train_fraction=st.floats(0.05, 0.9),
    val_fraction=st.floats(0.05, 0.9),
    seed=seeds,
)
def test_split_client_parts_are_disjoint_sorted_and_sized(
    n: int, train_fraction: float, val_fraction: float, seed: int
) -> None:
    if train_fraction + val_fraction >= 0.99:
        reject()
    indices = np.random.default_rng(seed).choice(10 * n, size=n, replace=False).astype(np.int64)
    n_train = math.floor(train_fraction * n + 1e-9)
    n_val = math.floor(val_fraction * n + 1e-9)
    if min(n_train, n_val, n - n_train - n_val) < 1:
        with pytest.raises(DataError, match=f"a client with {n} examples.*partition.min_size"):
            split_client(indices, train_fraction=train_fraction, val_fraction=val_fraction, rng=rng(seed))
        assert n < smallest_splittable(train_fraction, val_fraction)
        return
    split = split_client(indices, train_fraction=train_fraction, val_fraction=val_fraction, rng=rng(seed))
    assert (len(split.train), len(split.val)) == (n_train, n_val)
    parts = [split.train, split.val, split.test]
    union = check_disjoint_and_sorted(parts, 10 * n)
    np.testing.assert_array_equal(union, np.sort(indices))
    again = split_client(indices, train_fraction=train_fraction, val_fraction=val_fraction, rng=rng(seed))
    np.testing.assert_array_equal(again.test, split.test)


@pytest.mark.parametrize(("train", "val", "expected"), [(0.6, 0.2, 5), (0.5, 0.25, 4), (0.8, 0.1, 10)])
def test_smallest_splittable(train: float, val: float, expected: int) -> None:
    assert smallest_splittable(train, val) == expected
    # The bound is tight, and every larger client splits too.
    with pytest.raises(DataError):
        split_client(np.arange(expected - 1), train_fraction=train, val_fraction=val, rng=rng(0))
    for n in range(expected, expected + 60):
        split_client(np.arange(n), train_fraction=train, val_fraction=val, rng=rng(0))


@pytest.mark.parametrize(
    ("train", "val", "key"),
    [
        (0.0, 0.2, "partition.train_fraction = 0.0"),
        (1.0, 0.2, "partition.train_fraction = 1.0"),
        (0.6, 0.0, "partition.val_fraction = 0.0"),
        (0.7, 0.3, "partition.train_fraction \\+ partition.val_fraction"),
    ],
)
def test_split_fraction_errors_name_the_key(train: float, val: float, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        split_client(np.arange(100), train_fraction=train, val_fraction=val, rng=rng(0))


# ---------------------------------------------------------- unseen clients


@FAST
@given(num_clients=st.integers(1, 100), fraction=st.floats(0, 0.99), seed=seeds)
def test_choose_unseen_count_range_and_determinism(num_clients: int, fraction: float, seed: int) -> None:
    count = round(fraction * num_clients)
    if count >= num_clients:
        with pytest.raises(ConfigError, match=r"partition\.unseen_fraction"):
            choose_unseen(num_clients, fraction, seed)
        return
    unseen = choose_unseen(num_clients, fraction, seed)
    assert len(unseen) == count
    assert all(0 <= c < num_clients for c in unseen)
    assert choose_unseen(num_clients, fraction, seed) == unseen


def test_choose_unseen_uses_its_own_seeded_stream() -> None:
    # Keyed by (seed, "unseen") only, so the held-out clients do not change
    # when anything else that draws random numbers does.
    expected = rng(11, "unseen").choice(20, size=5, replace=False)
    assert choose_unseen(20, 0.25, 11) == frozenset(expected.tolist())


def test_choose_unseen_depends_on_the_seed() -> None:
    draws = {choose_unseen(50, 0.2, seed) for seed in range(5)}
    assert len(draws) == 5


@pytest.mark.parametrize("fraction", [1.0, -0.1, 0.99])
def test_choose_unseen_errors_name_the_key(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"partition\.unseen_fraction"):
        choose_unseen(10, fraction, 0)


# -------------------------------------------------------------- federation

FEDERATION_ARGS: dict[str, Any] = {
    "scheme": "dirichlet",
    "num_clients": 8,
    "seed": 7,
    "alpha": 0.5,
    "classes_per_client": 2,
    "min_size": 10,
    "train_fraction": 0.6,
    "val_fraction": 0.2,
    "unseen_fraction": 0.25,
}


def test_build_federation_composes_partition_split_and_unseen() -> None:
    labels = balanced_labels(2000, 10)
    fed = build_federation(labels, **FEDERATION_ARGS)

    parts = partition_labels(labels, scheme="dirichlet", num_clients=8, seed=7, alpha=0.5, min_size=10)
    assert len(fed.clients) == 8
    for client, (split, part) in enumerate(zip(fed.clients, parts, strict=True)):
        expected = split_client(part, train_fraction=0.6, val_fraction=0.2, rng=rng(7, "split", client))
        np.testing.assert_array_equal(split.train, expected.train)
        np.testing.assert_array_equal(split.val, expected.val)
        np.testing.assert_array_equal(split.test, expected.test)
        assert not split.train.flags.writeable  # shared through the cache
    assert fed.unseen == choose_unseen(8, 0.25, 7)
    assert len(fed.unseen) == 2
    assert fed.seen == tuple(sorted(set(range(8)) - fed.unseen))


def test_build_federation_is_cached_by_content() -> None:
    labels = balanced_labels(2000, 10)
    fed = build_federation(labels, **FEDERATION_ARGS)
    assert build_federation(labels.copy(), **FEDERATION_ARGS) is fed
    changed = labels.copy()
    changed[0] = (changed[0] + 1) % 10
    assert build_federation(changed, **FEDERATION_ARGS) is not fed
    other_seed = build_federation(labels, **{**FEDERATION_ARGS, "seed": 8})
    assert other_seed is not fed


def test_build_federation_names_a_client_too_small_to_split() -> None:
    labels = balanced_labels(40, 2)
    args = {**FEDERATION_ARGS, "scheme": "iid", "num_clients": 10, "min_size": 1}
    with pytest.raises(
        DataError, match=r"client 0: a client with 4 examples .* raise partition.min_size to 5"
    ):
        build_federation(labels, **args)


# -------------------------------------------------------------- label skew


def test_label_skew_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])], 2) == pytest.approx(0.5)
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])], 2) == pytest.approx(0.0)
    # Global (0.75, 0.25, 0): client {3} is (0, 1, 0) -> TV 0.75; client {0,1,2} is (1, 0, 0) -> 0.25.
    labels = np.array([0, 0, 0, 1])
    parts = [np.array([3]), np.array([0, 1, 2]), np.array([], dtype=np.int64)]
    assert label_skew(labels, parts, 3) == pytest.approx(0.5)


def test_classes_per_client_is_only_checked_by_the_pathological_scheme() -> None:
    one_class = np.zeros(50, dtype=np.int64)
    for scheme in ("iid", "dirichlet"):
        parts = partition_labels(
            one_class, scheme=scheme, num_clients=2, seed=0, classes_per_client=2, min_size=1
        )
        assert sum(len(p) for p in parts) == 50
