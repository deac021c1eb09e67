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

from fedmem.config import Config, DataConfig
from fedmem.data.datasets import load_dataset, to_tensor
from fedmem.data.membership import (
    CanaryPlan,
    canary_clients,
    hold_out,
    keep_mask,
    participants,
    plan_canaries,
)
from fedmem.data.partition import Federation, build_federation
from fedmem.errors import FederationError
from fedmem.models import Backbone, build_model
from fedmem.seeding import rng
from fedmem.strategy import ClientData, get_weights
from fedmem.updates import Weights


@dataclass(frozen=True)
class Pool:
    """The pooled data set (possibly a seeded subset) that the federation partitions."""

    x_uint8: np.ndarray  # (N, C, H, W)
    y: np.ndarray  # (N,) int64
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@functools.lru_cache(maxsize=4)
def pool(data: DataConfig, seed: int) -> Pool:
    """Load the data set and, if ``data.max_samples`` is set, draw a seeded subset of it."""
    ds = load_dataset(data.dataset, data.root, download=data.download)
    x, y = ds.x, ds.y
    if 0 < data.max_samples < len(y):
        keep = np.sort(rng(seed, "subset").choice(len(y), data.max_samples, replace=False))
        x, y = x[keep], y[keep]
    return Pool(x, y, ds.num_classes, tuple(ds.mean), tuple(ds.std))


@functools.lru_cache(maxsize=4)
def _split_pool(data: DataConfig, seed: int, n_canaries: int, references: int) -> tuple[Pool, Pool]:
    """The pool without the audit's held-out images, and the held-out images with their wrong labels."""
    p = pool(data, seed)
    index, wrong = hold_out(p.y, p.num_classes, n_canaries, references, seed)
    keep = np.setdiff1d(np.arange(len(p.y)), index)
    kept = Pool(p.x_uint8[keep], p.y[keep], p.num_classes, p.mean, p.std)
    return kept, Pool(p.x_uint8[index], wrong, p.num_classes, p.mean, p.std)


def _n_canaries(cfg: Config) -> int:
    a = cfg.audit
    return a.canary_clients * a.canaries_per_repetition * len(a.repetitions)


def _holds_out(cfg: Config) -> bool:
    """Federations of an audit with canaries all partition the pool minus the held-out images."""
    return bool(cfg.audit.role) and cfg.audit.canary_clients > 0


def pool_of(cfg: Config) -> Pool:
    """The images the run's clients share out: the pool, minus an audit's held-out images."""
    if not _holds_out(cfg):
        return pool(cfg.data, cfg.seed)
    return _split_pool(cfg.data, cfg.seed, _n_canaries(cfg), cfg.audit.references)[0]


def held_out(cfg: Config) -> tuple[Pool, CanaryPlan] | None:
    """An audit's held-out images (wrong labels) and what each is, or None without canaries."""
    if not _holds_out(cfg):
        return None
    held = _split_pool(cfg.data, cfg.seed, _n_canaries(cfg), cfg.audit.references)[1]
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


def training_clients(cfg: Config) -> tuple[int, ...]:
    """The clients that train: the seen ones, or a random half of them in a subsampled federation."""
    seen = federation(cfg).seen
    if cfg.audit.role == "subsample":
        return tuple(participants(cfg.seed, cfg.audit.index, seen))
    return seen


def federation(cfg: Config) -> Federation:
    """The partition of the pool into clients with their train / val / test splits."""
    p = cfg.partition
    return build_federation(
        pool_of(cfg).y,
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


Split = tuple[torch.Tensor, torch.Tensor]  # inputs (n, ...) and labels (n,)


def new_model(cfg: Config, *keys: int | str) -> Backbone:
    """The configured model for the run's data, initialised from the run seed (and ``keys``)."""
    p = pool(cfg.data, cfg.seed)
    shape = (int(p.x_uint8.shape[1]), int(p.x_uint8.shape[2]), int(p.x_uint8.shape[3]))
    m = cfg.model
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
    if cfg.audit.role == "shadow":
        train = train[keep_mask(cfg.seed, cfg.audit.index, pid, len(train))]
    xtr, ytr = _take(p, train)
    held = held_out(cfg)
    if held is not None and cfg.audit.role == "target":
        images, plan = held
        mine = plan.inserted_by(pid)
        if len(mine):
            xc, yc = _take(images, np.repeat(mine, plan.repetitions[mine]))
            xtr, ytr = torch.cat([xtr, xc]), torch.cat([ytr, yc])
    xva, yva = _take(p, split.val)
    return ClientData(pid, pid not in fed.unseen, p.num_classes, xtr, ytr, xva, yva), _take(p, split.test)


def _take(p: Pool, idx: np.ndarray) -> Split:
    # Normalise only these rows (a few ms): no float copy of the whole pool per actor.
    return to_tensor(p.x_uint8[idx], p.mean, p.std), torch.tensor(p.y[idx])


def audit_examples(cfg: Config, pid: int) -> dict[str, Split]:
    """What an audit scores on client ``pid``: ``train`` (its whole train split, members of the target,
    without canaries), ``test`` (non-members) and, with canaries, ``canary`` (every inserted and
    never-inserted canary of the audit, in :class:`CanaryPlan` order) and ``reference``."""
    split = federation(cfg).clients[pid]
    p = pool_of(cfg)
    out = {"train": _take(p, split.train), "test": _take(p, split.test)}
    held = held_out(cfg)
    if held is not None:
        images, plan = held
        out["canary"] = _take(images, plan.canaries)
        out["reference"] = _take(images, plan.references)
    return out
