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


def federation(cfg: Config) -> Federation:
    """The partition of the pool into clients with their train / val / test splits."""
    p = cfg.partition
    return build_federation(
        pool(cfg.data, cfg.seed).y,
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
    p = pool(cfg.data, cfg.seed)
    split = fed.clients[pid]

    def take(idx: np.ndarray) -> Split:
        # Normalise only this client's rows (a few ms): no float copy of the whole pool per actor.
        return to_tensor(p.x_uint8[idx], p.mean, p.std), torch.tensor(p.y[idx])

    (xtr, ytr), (xva, yva) = take(split.train), take(split.val)
    return ClientData(pid, pid not in fed.unseen, p.num_classes, xtr, ytr, xva, yva), take(split.test)
