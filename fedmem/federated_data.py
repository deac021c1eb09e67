"""The run's data as clients see it: the pooled data set, its partition, one client's splits, models.

Cached per process (module-level), so a Ray actor loads the data set once and re-uses it for
every client it runs. Both the engine (``fedmem.client``, ``fedmem.simulation``) and strategies
that need the run's model or federation (SCAFFOLD's N, IFCA's cluster initialisations) import
from here; nothing here knows a strategy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedmem.config import AuditConfig, Config, DataConfig
from fedmem.data.datasets import load_dataset, to_tensor
from fedmem.data.membership import (
    CanaryPlan,
    canary_clients,
    hold_out,
    keep_mask,
    participants,
    plan_canaries,
)
from fedmem.data.noise import LabelFlips, flip_labels, noisy_clients
from fedmem.data.partition import Federation, build_federation
from fedmem.data.tasks import apply_task
from fedmem.data.text import TextCorpus, canary_windows, corpus_windows, encode
from fedmem.errors import ConfigError, FederationError
from fedmem.models import Backbone, build_model, check_inputs, get_weights
from fedmem.probes.canaries import CanaryFormat, sample_distinct_codes
from fedmem.seeding import rng
from fedmem.updates import Weights


@dataclass(frozen=True)
class ClientData:
    """One client's train and validation splits: inputs (n, ...) and int64 targets (n, *positions).

    Images: float32 (n, C, H, W) and labels (n,). Text: int64 token windows (n, L) and the next
    character at each position (n, L).

    The test split is not here: evaluation keeps it and scores a personalized predictor
    afterwards, so nothing a strategy does can depend on it.
    """

    pid: int
    seen: bool  # False for clients held out of training
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input: (C, H, W) for images, (seq_len,) for text windows."""
        return tuple(int(d) for d in self.x_train.shape[1:])


@dataclass(frozen=True)
class Pool:
    """The pooled data set (possibly a seeded subset) that the federation partitions.

    Images: ``x`` (N, C, H, W) uint8 pixels, ``y`` (N,) int64 labels. Text: ``x`` (N, seq_len)
    uint8 token ids of disjoint windows, ``y`` (N, seq_len) uint8 next-character targets,
    ``groups`` (N,) the document (natural client) of each window, windows in text order.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    mean: tuple[float, ...] = ()  # images: per-channel normalisation
    std: tuple[float, ...] = ()
    groups: np.ndarray | None = None

    @property
    def is_text(self) -> bool:
        """Whether examples are token windows (one input axis) rather than images."""
        return self.x.ndim == 2

    def take(self, idx: np.ndarray) -> Split:
        """Rows ``idx`` as model inputs and int64 targets (images normalised, only these rows)."""
        return self.as_split(self.x[idx], self.y[idx])

    def as_split(self, x: np.ndarray, y: np.ndarray) -> Split:
        """Raw rows of this pool (uint8 pixels or token ids, labels) as model inputs and int64 targets."""
        targets = torch.from_numpy(np.asarray(y, dtype=np.int64))
        if self.is_text:
            return torch.from_numpy(np.asarray(x, dtype=np.int64)), targets
        return to_tensor(x, self.mean, self.std), targets


Split = tuple[torch.Tensor, torch.Tensor]  # inputs (n, ...) and targets (n, ...)


@functools.lru_cache(maxsize=4)
def pool(data: DataConfig, seed: int) -> Pool:
    """Load the data set and, if ``data.max_samples`` is set, draw a seeded subset of it (order kept)."""
    ds = load_dataset(data.dataset, data.root, download=data.download)
    if isinstance(ds, TextCorpus):
        x, y, groups = corpus_windows(ds, data.seq_len)
        full = Pool(x, y, ds.num_classes, groups=groups)
    else:
        full = Pool(ds.x, ds.y, ds.num_classes, tuple(ds.mean), tuple(ds.std))
    if 0 < data.max_samples < len(full.y):
        keep = np.sort(rng(seed, "subset").choice(len(full.y), data.max_samples, replace=False))
        return _subset(full, keep)
    return full


def _subset(p: Pool, keep: np.ndarray) -> Pool:
    groups = None if p.groups is None else p.groups[keep]
    return Pool(p.x[keep], p.y[keep], p.num_classes, p.mean, p.std, groups)


@functools.lru_cache(maxsize=4)
def _split_pool(data: DataConfig, seed: int, n_canaries: int, references: int) -> tuple[Pool, Pool]:
    """The pool without the audit's held-out images, and the held-out images with their wrong labels."""
    p = pool(data, seed)
    index, wrong = hold_out(p.y, p.num_classes, n_canaries, references, seed)
    keep = np.setdiff1d(np.arange(len(p.y)), index)
    return _subset(p, keep), Pool(p.x[index], wrong, p.num_classes, p.mean, p.std)


def _n_canaries(a: AuditConfig) -> int:
    return a.canary_clients * a.canaries_per_repetition * len(a.repetitions)


def _has_canaries(cfg: Config) -> bool:
    return bool(cfg.audit.role) and cfg.audit.canary_clients > 0


def _holds_out(cfg: Config) -> bool:
    """Image audits with canaries partition the pool minus held-out images (text canaries are new text)."""
    return _has_canaries(cfg) and not pool(cfg.data, cfg.seed).is_text


def pool_of(cfg: Config) -> Pool:
    """The images the run's clients share out: the pool, minus an audit's held-out images."""
    if not _holds_out(cfg):
        return pool(cfg.data, cfg.seed)
    return _split_pool(cfg.data, cfg.seed, _n_canaries(cfg.audit), cfg.audit.references)[0]


def held_out(cfg: Config) -> tuple[Pool, CanaryPlan] | None:
    """An audit's held-out images (wrong labels) and what each is, or None without canaries."""
    if not _holds_out(cfg):
        return None
    held = _split_pool(cfg.data, cfg.seed, _n_canaries(cfg.audit), cfg.audit.references)[1]
    a = cfg.audit
    clients = canary_clients(cfg.seed, federation(cfg).seen, a.canary_clients)
    plan = plan_canaries(
        np.arange(len(held.y)),
        held.y,
        clients,
        repetitions=a.repetitions,
        per_repetition=a.canaries_per_repetition,
    )
    return held, plan


@dataclass(frozen=True)
class TextCanaries:
    """An audit's Secret-Sharer canaries on a text data set (Carlini et al., USENIX Security 2019).

    ``codes[i]`` are the digits of ``plan`` entry ``i`` (inserted canaries, never-inserted
    canaries, then reference candidates); ``strings[i]`` its rendered line.
    """

    format: CanaryFormat
    codes: np.ndarray  # (n, n_slots) int64 digit indices
    strings: tuple[str, ...]
    plan: CanaryPlan


def text_canaries(cfg: Config) -> TextCanaries | None:
    """The audit's text canaries, or None (no canaries, or an image data set)."""
    if not _has_canaries(cfg) or not pool(cfg.data, cfg.seed).is_text:
        return None
    return _text_canaries(cfg.seed, federation(cfg).seen, cfg.audit, cfg.data.seq_len)


@functools.lru_cache(maxsize=4)
def _text_canaries(seed: int, seen: tuple[int, ...], a: AuditConfig, seq_len: int) -> TextCanaries:
    fmt = CanaryFormat(a.canary_format)
    n = _n_canaries(a)
    total = 2 * n + a.references
    if total > fmt.space_size:
        raise ConfigError(
            f"the audit needs {total} distinct canaries and references but audit.canary_format has only "
            f"{fmt.space_size} secrets; add digit slots or lower audit.references."
        )
    longest = len(fmt.render(np.zeros((1, fmt.n_slots), np.int64))[0]) + 2  # "\n" + line + "\n"
    if longest > seq_len + 1:
        raise ConfigError(
            f"a canary line takes {longest} characters but a window has data.seq_len + 1 = {seq_len + 1}; "
            "raise data.seq_len or shorten audit.canary_format."
        )
    codes = sample_distinct_codes(fmt, total, rng(seed, "text-canaries"))
    clients = canary_clients(seed, seen, a.canary_clients)
    plan = plan_canaries(
        np.arange(total),
        np.zeros(total, np.int64),
        clients,
        repetitions=a.repetitions,
        per_repetition=a.canaries_per_repetition,
    )
    return TextCanaries(fmt, codes, tuple(fmt.render(codes)), plan)


def training_clients(cfg: Config) -> tuple[int, ...]:
    """The clients that train: the seen ones, or a random half of them in a subsampled federation."""
    seen = federation(cfg).seen
    if cfg.audit.role == "subsample":
        return tuple(participants(cfg.seed, cfg.audit.index, seen))
    return seen


class _FederationKey:
    """A config hashed by the parts that decide its federation (data, partition, seed, audit)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.key = (cfg.data, cfg.partition, cfg.seed, cfg.audit)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _FederationKey) and self.key == other.key


def federation(cfg: Config) -> Federation:
    """The partition of the pool into clients with their train / val / test splits.

    Cached per process by the config parts it reads: every client call asks for it, and
    recomputing the key of :func:`~fedmem.data.partition.build_federation`'s own cache (a hash of
    every label of the pool) cost about 1-4 ms a client.
    """
    return _federation(_FederationKey(cfg))


@functools.lru_cache(maxsize=16)
def _federation(key: _FederationKey) -> Federation:
    cfg = key.cfg
    p = cfg.partition
    return build_federation(
        _partition_labels(cfg),
        scheme=p.scheme,
        num_clients=p.num_clients,
        seed=cfg.seed,
        alpha=p.alpha,
        classes_per_client=p.classes_per_client,
        min_size=p.min_size,
        train_fraction=p.train_fraction,
        val_fraction=p.val_fraction,
        unseen_fraction=p.unseen_fraction,
    )


def _partition_labels(cfg: Config) -> np.ndarray:
    """What the partition scheme reads: class labels, or natural client ids for ``natural``."""
    p = pool_of(cfg)
    scheme = cfg.partition.scheme
    if scheme == "natural":
        if p.groups is None:
            raise ConfigError(
                "partition.scheme = 'natural' needs a data set with natural clients, but "
                f"{cfg.data.dataset!r} has none; valid schemes for it: iid, dirichlet, pathological."
            )
        return p.groups
    if p.is_text:
        if scheme != "iid":
            raise ConfigError(
                f"partition.scheme = {scheme!r} needs one class label per example, but {cfg.data.dataset!r} "
                "is text; valid schemes for it: natural, iid."
            )
        return np.zeros(len(p.y), np.int64)  # iid reads only the number of examples
    return p.y


def new_model(cfg: Config, *keys: int | str) -> Backbone:
    """The configured model for the run's data, initialised from the run seed (and ``keys``)."""
    p = pool(cfg.data, cfg.seed)
    shape = tuple(int(d) for d in p.x.shape[1:])
    m = cfg.model
    check_inputs(m.name, shape, cfg.data.dataset)
    return build_model(m.name, shape, p.num_classes, m.embedding_dim, cfg.seed, *keys)


def initial_weights(cfg: Config, *keys: int | str) -> Weights:
    """Starting weights of the configured model, from the run seed (and ``keys`` for further models)."""
    return get_weights(new_model(cfg, *keys))


def client_data(cfg: Config, pid: int) -> tuple[ClientData, Split]:
    """Client ``pid``'s train and validation splits, and, apart, its test split."""
    fed = federation(cfg)
    if not 0 <= pid < len(fed.clients):
        raise FederationError(f"partition id {pid} is outside 0..{len(fed.clients) - 1}")
    p = pool_of(cfg)
    split = fed.clients[pid]
    train = split.train
    (xtr, ytr), _ = _train_take(cfg, pid, p, train)
    if cfg.audit.role == "shadow":
        # label noise is drawn over the whole train split, so a shadow's members carry the target's flips
        keep = torch.from_numpy(keep_mask(cfg.seed, cfg.audit.index, pid, len(train)))
        xtr, ytr = xtr[keep], ytr[keep]
    if cfg.audit.role == "target":
        xtr, ytr = _insert_canaries(cfg, pid, p, train, xtr, ytr)
    xva, yva = _client_take(cfg, pid, p, split.val)
    test = _client_take(cfg, pid, p, split.test)
    return ClientData(pid, pid not in fed.unseen, p.num_classes, xtr, ytr, xva, yva), test


def _client_take(cfg: Config, pid: int, p: Pool, idx: np.ndarray) -> Split:
    """Rows ``idx`` of the pool as client ``pid`` sees them: through its task (``data.tasks``), if any.

    The one place a client's own examples are read, so training, evaluation and audits all see the
    same relabelled, marked examples.
    """
    d = cfg.data
    if not d.tasks:
        return p.take(idx)
    x, y = apply_task(
        d.tasks, p.x[idx], p.y[idx], seed=cfg.seed, client=pid, num_classes=p.num_classes, cell=d.marker_cell
    )
    return p.as_split(x, y)


def label_flips(cfg: Config, pid: int, labels: np.ndarray) -> LabelFlips | None:
    """Client ``pid``'s label noise over its train split's ``labels`` (after its task), or None.

    None when ``data.label_noise`` is 0 or ``pid`` is not one of the noisy clients
    (``data.noisy_clients``; every seen client when empty). See :mod:`fedmem.data.noise`.
    """
    d = cfg.data
    if d.label_noise == 0 or pid not in noisy_clients(d.noisy_clients, federation(cfg).seen):
        return None
    return flip_labels(cfg.seed, pid, labels, d.label_noise, pool_of(cfg).num_classes)


def _train_take(cfg: Config, pid: int, p: Pool, idx: np.ndarray) -> tuple[Split, LabelFlips | None]:
    """Client ``pid``'s train split ``idx`` as it trains on it: through its task, then its label noise."""
    x, y = _client_take(cfg, pid, p, idx)
    flips = label_flips(cfg, pid, y.numpy())
    if flips is not None:
        y = torch.from_numpy(flips.labels)
    return (x, y), flips


@dataclass(frozen=True)
class NoisyExamples:
    """The flipped examples a client trains on: inputs, their noisy labels and their original labels."""

    x: torch.Tensor  # (m, ...)
    noisy: np.ndarray  # (m,) int64, the labels the client trains on
    original: np.ndarray  # (m,) int64, the labels before flipping


@dataclass(frozen=True)
class NoisyTrain:
    """A noisy client's own train examples as it trains on them, and which of them were flipped."""

    x: torch.Tensor  # (n, ...)
    labels: np.ndarray  # (n,) int64, the labels it trains on (noisy where ``flipped``)
    original: np.ndarray  # (n,) int64, the labels before flipping
    flipped: np.ndarray  # (n,) bool


def noisy_train(cfg: Config, pid: int) -> NoisyTrain | None:
    """Client ``pid``'s train split with its flip mask, or None if the client is not noisy.

    Its own examples only: a target's canaries are left out, a shadow federation keeps its
    members. A noisy client may have no flipped example (``round(label_noise * n) = 0``).
    """
    split = federation(cfg).clients[pid]
    (x, _), flips = _train_take(cfg, pid, pool_of(cfg), split.train)
    if flips is None:
        return None
    if cfg.audit.role != "shadow":
        return NoisyTrain(x, flips.labels, flips.original, flips.mask)
    keep = keep_mask(cfg.seed, cfg.audit.index, pid, len(split.train))
    return NoisyTrain(x[torch.from_numpy(keep)], flips.labels[keep], flips.original[keep], flips.mask[keep])


def noisy_examples(cfg: Config, pid: int) -> NoisyExamples | None:
    """Client ``pid``'s flipped train examples (a shadow federation's members only), or None if none."""
    train = noisy_train(cfg, pid)
    if train is None or not train.flipped.any():
        return None
    mask = train.flipped
    x = train.x[torch.from_numpy(np.flatnonzero(mask))]
    return NoisyExamples(x, train.labels[mask], train.original[mask])


def _insert_canaries(
    cfg: Config, pid: int, p: Pool, train: np.ndarray, xtr: torch.Tensor, ytr: torch.Tensor
) -> Split:
    """The target federation's train split plus client ``pid``'s canaries, each repeated its count."""
    held = held_out(cfg)
    if held is not None:
        images, plan = held
        mine = plan.inserted_by(pid)
        if len(mine):
            xc, yc = images.take(np.repeat(mine, plan.repetitions[mine]))
            return torch.cat([xtr, xc]), torch.cat([ytr, yc])
    text = text_canaries(cfg)
    if text is not None:
        mine = text.plan.inserted_by(pid)
        if len(mine):
            lines = [
                encode("\n" + text.strings[i] + "\n") for i in np.repeat(mine, text.plan.repetitions[mine])
            ]
            filler = p.x[train].reshape(-1)  # the client's own text around each occurrence
            xt, yt = canary_windows(lines, filler, cfg.data.seq_len, rng(cfg.seed, "canary-text", pid))
            return (
                torch.cat([xtr, torch.from_numpy(xt.astype(np.int64))]),
                torch.cat([ytr, torch.from_numpy(yt.astype(np.int64))]),
            )
    return xtr, ytr


def audit_examples(cfg: Config, pid: int) -> dict[str, Split]:
    """What an audit scores on client ``pid``: ``train`` (its whole train split, members of the target,
    without canaries), ``test`` (non-members) and, with canaries, ``canary`` (every inserted and
    never-inserted canary of the audit, in :class:`CanaryPlan` order) and ``reference``.

    ``train`` and ``test`` pass through the client's task (``data.tasks``) as in training, ``train``
    with its label noise (``data.label_noise``) too; canaries and references are the audit's own
    held-out examples with their own labels, left as they are."""
    split = federation(cfg).clients[pid]
    p = pool_of(cfg)
    out = {"train": _train_take(cfg, pid, p, split.train)[0], "test": _client_take(cfg, pid, p, split.test)}
    held = held_out(cfg)
    if held is not None:
        images, plan = held
        out["canary"] = images.take(plan.canaries)
        out["reference"] = images.take(plan.references)
    return out
