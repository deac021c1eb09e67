"""Shared fixtures: small real-data scenarios (Fashion-MNIST subsets) written into tmp dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedmem.config import Config, load_config
from fedmem.training import Batch, Draw

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


def old_default_step(
    model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """The training loop's default step before ``strategy.loss`` and ``strategy.gradient`` existed,
    verbatim: the oracle the "options off" tests compare the loop against."""
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
