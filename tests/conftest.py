"""Shared fixtures: small real-data scenarios (Fashion-MNIST subsets) written into tmp dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fedmem.config import Config, load_config

TINY = [
    "data.max_samples=1200",
    "partition.num_clients=4",
    "partition.unseen_fraction=0.25",
    "rounds=2",
    "eval_every=1",
    "strategy.batch_size=32",
    "memory.k_grid=[3, 5]",
    "memory.lambda_grid=[0.0, 0.5, 1.0]",
]


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Config]:
    """A factory for a 4-client, 2-round scenario on 1,200 Fashion-MNIST images, writing under tmp_path."""

    def make(*overrides: str) -> Config:
        return load_config("default", [*TINY, f"runtime.output_dir='{tmp_path / 'runs'}'", *overrides])

    return make
