"""Partition a labelled data set among clients and split each client's share.

Four partition schemes, pure functions of the label array and a seed:

- ``iid``: a seeded permutation cut into contiguous, near-equal shards.
- ``dirichlet``: label skew drawn from a symmetric Dirichlet distribution, as
  proposed by Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification" (2019, arXiv:1909.06335):
  for each class, the proportions going to the N clients are drawn from
  Dir(alpha * 1_N). Small alpha (0.1) gives clients few classes; large alpha
  (100) is close to IID.
- ``pathological``: each client holds exactly ``classes_per_client`` classes.
  Pathological non-IID data comes from McMahan et al., "Communication-Efficient
  Learning of Deep Networks from Decentralized Data" (AISTATS 2017), who gave
  each client two shards of label-sorted data; the variant here is the "#C=k"
  partition of Li, Diao, Chen and He, "Federated Learning on Non-IID Data
  Silos: An Experimental Study" (ICDE 2022, arXiv:2102.02079).
- ``natural``: for data sets with a natural client id (a text corpus's
  documents), one client per id, ``labels`` being those ids; clients keep
  their examples in order and are split into contiguous runs.

Each of the first three reproduces, index for index, the flwr-datasets 0.6 partitioner of
the same name given the same seed (``IidPartitioner`` behind
``FederatedDataset``'s seeded shuffle, ``DirichletPartitioner`` with
``self_balancing=False``, ``PathologicalPartitioner`` with
``class_assignment_mode="first-deterministic"``); the tests check this against
flwr-datasets itself. We re-implement rather than call them because importing
flwr_datasets costs 2-3 s per process (it pulls in HF datasets, matplotlib,
seaborn and scipy.stats) and going through a Hugging Face Dataset costs
0.2-9 s more for 70k labels (per-row formatting and dill fingerprints of index
lists), paid again by every Ray actor; the numpy versions take milliseconds.

Each client's share is then split into train / validation / test parts
(:func:`split_client`), and a seeded fraction of clients is held out of
training as unseen clients (:func:`choose_unseen`); :func:`build_federation`
does all three and caches the result per process.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fedmem.errors import ConfigError, DataError
from fedmem.registry import Registry
from fedmem.seeding import rng

# flwr-datasets' DirichletPartitioner redraws when a client gets fewer than
# min_partition_size examples and gives up after this many draws.
DIRICHLET_MAX_DRAWS = 11

IndexArray = NDArray[np.int64]


class Scheme(Protocol):
    """A partition scheme: label array -> one (unsorted) index array per client.

    Every scheme receives every partition parameter and ignores those it does
    not use, so the registry can hold them side by side.
    """

    def __call__(
        self,
        labels: IndexArray,
        *,
        num_clients: int,
        seed: int,
        alpha: float,
        classes_per_client: int,
        min_size: int,
    ) -> list[IndexArray]: ...


def iid(
    labels: IndexArray, *, num_clients: int, seed: int, alpha: float, classes_per_client: int, min_size: int
) -> list[IndexArray]:
    """Cut a seeded permutation of all indices into ``num_clients`` contiguous shards.

    The first ``n % num_clients`` shards get one extra example: the sizes of
    Hugging Face's ``Dataset.shard(contiguous=True)``, which flwr-datasets'
    ``IidPartitioner`` uses after ``FederatedDataset`` shuffles with
    ``np.random.default_rng(seed).permutation``.
    """
    n = len(labels)
    permutation = np.random.default_rng(seed).permutation(n)
    per_client, extra = divmod(n, num_clients)
    bounds = [per_client * i + min(i, extra) for i in range(num_clients + 1)]
    return [permutation[bounds[i] : bounds[i + 1]] for i in range(num_clients)]


def dirichlet(
    labels: IndexArray, *, num_clients: int, seed: int, alpha: float, classes_per_client: int, min_size: int
) -> list[IndexArray]:
    """Label skew of Hsu et al. (2019): per class, client proportions ~ Dir(alpha * 1).

    Follows flwr-datasets' ``DirichletPartitioner`` (without self-balancing):
    classes in ascending order, one Dirichlet draw per class from one
    ``np.random.default_rng(seed)``, each class's indices (ascending) cut at
    ``floor(cumsum(proportions) * class_size)``. If any client ends up with
    fewer than ``min_size`` examples, the whole assignment is redrawn from the
    same generator (so the result is still a function of the seed), at most
    :data:`DIRICHLET_MAX_DRAWS` times.

    Raises
    ------
    DataError
        If no draw gives every client ``min_size`` examples.
    """
    generator = np.random.default_rng(seed)
    concentration = np.full(num_clients, float(alpha))
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(DIRICHLET_MAX_DRAWS):
        chunks: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        for class_indices in by_class:
            proportions = generator.dirichlet(concentration)  # (num_clients,), sums to 1
            cuts = (np.cumsum(proportions) * len(class_indices)).astype(int)[:-1]
            for client, part in enumerate(np.split(class_indices, cuts)):
                chunks[client].append(part)
        parts = [np.concatenate(c) for c in chunks]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise DataError(
        f"Dirichlet partitioning with partition.alpha = {alpha} left a client with {smallest} "
        f"examples, fewer than partition.min_size = {min_size}, in all {DIRICHLET_MAX_DRAWS} draws; "
        "raise partition.alpha, lower partition.min_size or lower partition.num_clients."
    )


def pathological(
    labels: IndexArray, *, num_clients: int, seed: int, alpha: float, classes_per_client: int, min_size: int
) -> list[IndexArray]:
    """Give each client exactly ``classes_per_client`` classes (Li et al. 2022's #C=k).

    Follows flwr-datasets' ``PathologicalPartitioner`` with
    ``class_assignment_mode="first-deterministic"`` (the mode of Li et al.):
    client i gets class ``i % num_classes`` plus classes drawn uniformly
    (rejecting repeats) from ``np.random.default_rng(seed)``; then each class's
    indices (ascending) are cut by ``np.array_split`` into as many near-equal
    pieces as clients hold it, handed out in client order.

    Every index is assigned when ``num_clients >= num_classes``, since every
    class is some client's first class. With fewer clients than classes, the
    examples of classes that no client drew are dropped, as in flwr-datasets:
    in a pathological partition they belong to nobody.

    Raises
    ------
    DataError
        If a class has fewer examples than the clients that hold it.
    """
    generator = np.random.default_rng(seed)
    classes = np.unique(labels)
    assigned: list[list[int]] = []
    for client in range(num_clients):
        chosen = [int(classes[client % len(classes)])]
        while len(chosen) < classes_per_client:
            # Uniform with rejection of repeats, as flwr-datasets draws them.
            drawn = int(generator.choice(classes, size=1)[0])
            if drawn not in chosen:
                chosen.append(drawn)
        assigned.append(chosen)

    chunks: list[list[IndexArray]] = [[] for _ in range(num_clients)]
    for c in classes.tolist():
        holders = [client for client in range(num_clients) if c in assigned[client]]
        if not holders:
            continue
        class_indices = np.flatnonzero(labels == c)
        if len(class_indices) < len(holders):
            raise DataError(
                f"class {c} has {len(class_indices)} examples but the pathological partition gives it to "
                f"{len(holders)} clients; lower partition.num_clients or partition.classes_per_client."
            )
        for client, part in zip(holders, np.array_split(class_indices, len(holders)), strict=True):
            chunks[client].append(part)
    return [np.concatenate(c) if c else np.empty(0, dtype=np.int64) for c in chunks]


def natural(
    labels: IndexArray, *, num_clients: int, seed: int, alpha: float, classes_per_client: int, min_size: int
) -> list[IndexArray]:
    """One client per natural client id (a text corpus's document), ``labels`` being those ids.

    Ids with fewer than ``min_size`` examples are dropped; ``num_clients`` of the rest are drawn
    uniformly without replacement (``rng(seed, "natural-clients")``), as LEAF samples its
    writers and speakers, and given partition ids in ascending id order. Each client's
    indices keep their order, which :func:`build_federation` splits into contiguous runs.
    """
    ids, counts = np.unique(labels, return_counts=True)
    eligible = ids[counts >= min_size]
    if num_clients > len(eligible):
        raise DataError(
            f"partition.num_clients = {num_clients} but only {len(eligible)} of the {len(ids)} natural "
            f"clients hold at least partition.min_size = {min_size} examples; lower one of them."
        )
    chosen = np.sort(rng(seed, "natural-clients").choice(eligible, num_clients, replace=False))
    return [np.flatnonzero(labels == c) for c in chosen]


SCHEMES: Registry[Scheme] = Registry("partition scheme", "partition.scheme")
SCHEMES.register("iid", iid)
SCHEMES.register("dirichlet", dirichlet)
SCHEMES.register("pathological", pathological)
SCHEMES.register("natural", natural)

# Schemes whose clients' examples are in a meaningful order (text positions): split into
# contiguous runs instead of shuffled, so no window of a split neighbours one of another.
ORDERED_SCHEMES = frozenset({"natural"})


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True clients is a config mistake, not 1 client.
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _as_labels(labels: NDArray[np.integer]) -> IndexArray:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"labels must be a 1-d integer array, got dtype {array.dtype} and shape {array.shape}."
        )
    if array.size == 0:
        raise DataError("there are no labels to partition: the data set is empty.")
    if array.min() < 0:
        raise DataError(f"labels must be non-negative class ids, found {int(array.min())}.")
    return array.astype(np.int64, copy=False)


def partition_labels(
    labels: IndexArray,
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.3,
    classes_per_client: int = 2,
    min_size: int = 10,
) -> list[IndexArray]:
    """Partition example indices among clients by their labels.

    Parameters
    ----------
    labels:
        Class id of every example, shape (n,).
    scheme:
        "iid", "dirichlet", "pathological" (see the module docstring) or "natural"
        (``labels`` are then natural client ids, see :func:`natural`).
    num_clients:
        Number of clients, between 1 and n (``natural``: at most the number of natural clients).
    seed:
        Seeds one ``np.random.default_rng(seed)``, as flwr-datasets does, so a
        Flower user with the same seed gets the same partition.
    alpha:
        Dirichlet concentration (``dirichlet`` only), > 0; smaller is more skewed.
    classes_per_client:
        Classes per client (``pathological`` only, and only checked then),
        between 1 and the number of classes present in ``labels``.
    min_size:
        Fewest examples a client may get, >= 1 (``dirichlet`` redraws to meet it).

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` int64 index arrays into ``labels``, each sorted ascending
        and pairwise disjoint. For ``iid`` and ``dirichlet`` they cover every
        index; ``pathological`` drops the classes no client drew, which only
        happens with fewer clients than classes.

    Raises
    ------
    ConfigError
        If a parameter is out of range; the message names its config key.
    DataError
        If the labels cannot be partitioned as asked (a client below ``min_size``).
    """
    labels = _as_labels(labels)
    partitioner = SCHEMES.get(scheme)
    n = len(labels)
    if not _is_int(num_clients) or not 1 <= num_clients <= n:
        raise ConfigError(
            f"partition.num_clients = {num_clients!r} must be an integer between 1 "
            f"and the number of examples ({n})."
        )
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"the seed must be a non-negative integer, got {seed!r}.")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(
            f"partition.alpha = {alpha!r} must be a positive number "
            "(0.1 is strong label skew, 100 close to IID)."
        )
    if scheme == "pathological":
        # Checked only where it is used: its range depends on the data, and the
        # default of 2 must not fail an IID run on a one-class subset.
        num_classes = len(np.unique(labels))
        if not _is_int(classes_per_client) or not 1 <= classes_per_client <= num_classes:
            raise ConfigError(
                f"partition.classes_per_client = {classes_per_client!r} must be between 1 and "
                f"the number of classes ({num_classes})."
            )
    if not _is_int(min_size) or min_size < 1:
        raise ConfigError(f"partition.min_size = {min_size!r} must be an integer of at least 1.")

    parts = partitioner(
        labels,
        num_clients=num_clients,
        seed=seed,
        alpha=alpha,
        classes_per_client=classes_per_client,
        min_size=min_size,
    )
    sizes = [len(p) for p in parts]
    if min(sizes) < min_size:
        client = sizes.index(min(sizes))
        raise DataError(
            f"the {scheme} partition gives client {client} only {sizes[client]} examples, fewer than "
            f"partition.min_size = {min_size}; lower partition.num_clients or partition.min_size."
        )
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


@dataclass(frozen=True, eq=False)
class ClientSplit:
    """One client's examples as global indices into the data set, each part sorted.

    Attributes
    ----------
    train, val, test:
        Disjoint int64 index arrays; ``val`` tunes per-client hyperparameters,
        ``test`` measures personalized accuracy.
    """

    train: IndexArray
    val: IndexArray
    test: IndexArray


def _part_size(fraction: float, n: int) -> int:
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
    return math.floor(fraction * n + 1e-9)


def _split_sizes(n: int, train_fraction: float, val_fraction: float) -> tuple[int, int, int]:
    n_train = _part_size(train_fraction, n)
    n_val = _part_size(val_fraction, n)
    return n_train, n_val, n - n_train - n_val


def _check_fractions(train_fraction: float, val_fraction: float) -> None:
    if not 0 < train_fraction < 1:
        raise ConfigError(
            f"partition.train_fraction = {train_fraction!r} must be between 0 and 1 (exclusive)."
        )
    if not 0 < val_fraction < 1:
        raise ConfigError(f"partition.val_fraction = {val_fraction!r} must be between 0 and 1 (exclusive).")
    if train_fraction + val_fraction >= 1:
        raise ConfigError(
            f"partition.train_fraction + partition.val_fraction = {train_fraction + val_fraction!r} "
            "must be below 1 so that every client keeps a test split."
        )


def smallest_splittable(train_fraction: float, val_fraction: float) -> int:
    """The fewest examples a client needs for non-empty train, val and test parts.

    Every larger size works too: each part's size is non-decreasing in n
    (the test part is at least ``n * (1 - train_fraction - val_fraction) > 0``).
    """
    _check_fractions(train_fraction, val_fraction)
    n = 3
    while min(_split_sizes(n, train_fraction, val_fraction)) < 1:
        n += 1
    return n


def split_client(
    indices: IndexArray,
    *,
    train_fraction: float,
    val_fraction: float,
    rng: np.random.Generator,
    contiguous: bool = False,
) -> ClientSplit:
    """Shuffle one client's indices and cut them into train, validation and test parts.

    Parameters
    ----------
    indices:
        The client's global example indices.
    train_fraction, val_fraction:
        The train part gets ``floor(train_fraction * n)`` examples, the
        validation part ``floor(val_fraction * n)``, the test part the rest.
    rng:
        Generator for the shuffle (``fedmem.seeding.rng(seed, "split", client_id)``).
    contiguous:
        Cut ``indices`` in their given order instead (first part train, then validation, then
        test), for examples that are consecutive pieces of one text.

    Returns
    -------
    ClientSplit
        Three disjoint, sorted parts whose union is ``indices``.

    Raises
    ------
    ConfigError
        If a fraction is outside (0, 1) or they sum to 1 or more.
    DataError
        If ``indices`` is too small for every part to get an example.
    """
    _check_fractions(train_fraction, val_fraction)
    n = len(indices)
    n_train, n_val, n_test = _split_sizes(n, train_fraction, val_fraction)
    if min(n_train, n_val, n_test) < 1:
        need = smallest_splittable(train_fraction, val_fraction)
        raise DataError(
            f"a client with {n} examples cannot be split into {n_train} train / {n_val} val / {n_test} test "
            f"examples; every part needs one, which takes at least {need} examples with these fractions: "
            f"raise partition.min_size to {need} or lower partition.num_clients."
        )
    ordered = np.asarray(indices, dtype=np.int64)
    shuffled = ordered if contiguous else rng.permutation(ordered)
    return ClientSplit(
        train=np.sort(shuffled[:n_train]),
        val=np.sort(shuffled[n_train : n_train + n_val]),
        test=np.sort(shuffled[n_train + n_val :]),
    )


def choose_unseen(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """Pick the clients held out of training, uniformly without replacement.

    Parameters
    ----------
    num_clients:
        Total number of clients (ids 0..num_clients-1).
    fraction:
        Fraction to hold out; ``round(fraction * num_clients)`` clients are
        chosen (Python's round: halves go to the even neighbour).
    seed:
        The run seed; the draw uses ``fedmem.seeding.rng(seed, "unseen")``.

    Raises
    ------
    ConfigError
        If ``fraction`` is outside [0, 1) or would leave no client to train on.
    """
    if not _is_int(num_clients) or num_clients < 1:
        raise ConfigError(f"partition.num_clients = {num_clients!r} must be an integer of at least 1.")
    if not 0 <= fraction < 1:
        raise ConfigError(f"partition.unseen_fraction = {fraction!r} must be in [0, 1).")
    count = round(fraction * num_clients)
    if count >= num_clients:
        raise ConfigError(
            f"partition.unseen_fraction = {fraction!r} holds out all {num_clients} clients; "
            "lower it so that at least one client trains."
        )
    chosen = rng(seed, "unseen").choice(num_clients, size=count, replace=False)
    return frozenset(int(c) for c in chosen)


@dataclass(frozen=True, eq=False)
class Federation:
    """Every client's split and which clients are held out of training.

    Attributes
    ----------
    clients:
        One :class:`ClientSplit` per partition id 0..N-1; arrays are read-only
        because the object is shared through a per-process cache.
    unseen:
        Partition ids held out of training, evaluated after it.
    """

    clients: tuple[ClientSplit, ...]
    unseen: frozenset[int]

    @property
    def seen(self) -> tuple[int, ...]:
        """Sorted partition ids of the clients that train."""
        return tuple(c for c in range(len(self.clients)) if c not in self.unseen)


class _HashedLabels:
    """Labels hashed by content, so they can key an lru_cache."""

    def __init__(self, labels: IndexArray) -> None:
        self.labels = labels
        self.digest = hashlib.blake2b(labels.tobytes(), digest_size=16).digest()

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HashedLabels) and self.digest == other.digest


def build_federation(
    labels: IndexArray,
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float,
    classes_per_client: int,
    min_size: int,
    train_fraction: float,
    val_fraction: float,
    unseen_fraction: float,
) -> Federation:
    """Partition, split every client and choose the unseen clients, cached per process.

    The partition is seeded by ``seed`` (see :func:`partition_labels`), client
    i's split by ``rng(seed, "split", i)``, the unseen clients by
    ``rng(seed, "unseen")``, so each is independent of the others and of how
    often or where (which Ray actor) this is called. Repeated calls with the
    same labels (by content) and arguments return the same object.

    Raises
    ------
    ConfigError, DataError
        As :func:`partition_labels`, :func:`split_client` and :func:`choose_unseen`;
        a split failure names the client.
    """
    return _build_federation(
        _HashedLabels(_as_labels(labels)),
        scheme,
        num_clients,
        seed,
        alpha,
        classes_per_client,
        min_size,
        train_fraction,
        val_fraction,
        unseen_fraction,
    )


@functools.lru_cache(maxsize=8)
def _build_federation(
    hashed: _HashedLabels,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float,
    classes_per_client: int,
    min_size: int,
    train_fraction: float,
    val_fraction: float,
    unseen_fraction: float,
) -> Federation:
    # Check the fractions before partitioning so a bad value fails fast with its key.
    _check_fractions(train_fraction, val_fraction)
    parts = partition_labels(
        hashed.labels,
        scheme=scheme,
        num_clients=num_clients,
        seed=seed,
        alpha=alpha,
        classes_per_client=classes_per_client,
        min_size=min_size,
    )
    unseen = choose_unseen(num_clients, unseen_fraction, seed)
    clients = []
    for client, part in enumerate(parts):
        try:
            split = split_client(
                part,
                train_fraction=train_fraction,
                val_fraction=val_fraction,
                rng=rng(seed, "split", client),
                contiguous=scheme in ORDERED_SCHEMES,
            )
        except DataError as exc:
            raise DataError(f"client {client}: {exc}") from exc
        for array in (split.train, split.val, split.test):
            array.setflags(write=False)
        clients.append(split)
    return Federation(clients=tuple(clients), unseen=unseen)


def label_skew(labels: IndexArray, parts: list[IndexArray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    ``TV(p, q) = 0.5 * sum_c |p_c - q_c|``, 0 for identical distributions and
    1 for disjoint ones; the global distribution is that of all of ``labels``.
    Clients without examples are left out of the mean.

    Parameters
    ----------
    labels:
        Class id of every example, shape (n,), in [0, num_classes).
    parts:
        Index arrays into ``labels``, one per client.
    num_classes:
        Number of classes.
    """
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be non-empty class ids in [0, {num_classes})")
    global_dist = np.bincount(labels, minlength=num_classes) / len(labels)  # (num_classes,)
    distances = [
        0.5 * float(np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - global_dist).sum())
        for p in parts
        if len(p)
    ]
    if not distances:
        raise ValueError("label_skew needs at least one client with examples")
    return float(np.mean(distances))


def label_entropy(labels: IndexArray, num_classes: int) -> float:
    """Shannon entropy (bits) of the label distribution of ``labels``: 0 for one class, log2(C) for uniform.

    Used to relate a client's personalization gain to how skewed its data are.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    p = np.bincount(labels, minlength=num_classes) / labels.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())
