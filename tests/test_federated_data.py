"""The per-process cache of federations: keyed by what decides a federation, never stale."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmem.config import Config
from fedmem.data.partition import Federation
from fedmem.federated_data import _federation, _FederationKey, federation


def _fresh(cfg: Config) -> Federation:
    return _federation.__wrapped__(_FederationKey(cfg))  # the same computation, bypassing the cache


def _same_splits(a: Federation, b: Federation) -> bool:
    return (
        len(a.clients) == len(b.clients)
        and all(
            np.array_equal(x.train, y.train)
            and np.array_equal(x.val, y.val)
            and np.array_equal(x.test, y.test)
            for x, y in zip(a.clients, b.clients, strict=True)
        )
        and a.unseen == b.unseen
    )


def test_settings_that_do_not_decide_the_federation_share_one(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config()
    fed = federation(cfg)
    for other in (
        cfg.with_runtime(run_dir="/tmp/elsewhere"),
        tiny_config("strategy.lr=0.5", "rounds=7", "model.embedding_dim=16"),
    ):
        assert federation(other) is fed


def test_every_setting_that_decides_the_federation_gets_its_own(tiny_config: Callable[..., Config]) -> None:
    base = tiny_config("audit.canary_clients=0")
    others = [
        tiny_config("audit.canary_clients=0", "seed=1"),
        tiny_config("audit.canary_clients=0", "partition.num_clients=5"),
        tiny_config("audit.canary_clients=0", "partition.scheme='iid'"),
        tiny_config("audit.canary_clients=0", "data.max_samples=1000"),
        # an image audit with canaries partitions the pool minus its held-out images
        tiny_config("audit.role='target'", "audit.canary_clients=1", "audit.references=50"),
    ]
    fed = federation(base)
    for cfg in others:
        got = federation(cfg)
        assert not _same_splits(got, fed)
        assert _same_splits(got, _fresh(cfg))
    assert _same_splits(federation(base), _fresh(base))
