"""A synthetic client (random images, random labels) for strategy-level tests without any data set."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmem.config import Config, load_config
from fedmem.models import build_model
from fedmem.strategy import ClientContext, ClientData, ServerContext


def synthetic_client(
    cfg: Config, pid: int = 0, n: int = 60, num_classes: int = 4, seed: int = 0
) -> ClientData:
    g = torch.Generator().manual_seed(seed)

    def part(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, num_classes, (size,), generator=g)

    (a, b), (c, d) = part(n), part(n // 2)
    return ClientData(pid, True, num_classes, a, b, c, d)


def synthetic_test(n: int = 30, num_classes: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A test split for a synthetic client (strategies never see it; evaluation scores with it)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, num_classes, (n,), generator=g)


@pytest.fixture
def make_ctx(tmp_path: Path) -> Callable[..., ClientContext]:
    def make(*overrides: str, pid: int = 0, server_round: int = 1, **kw: int) -> ClientContext:
        cfg = load_config("default", [*overrides, f"runtime.run_dir='{tmp_path}'"])
        return ClientContext(cfg, pid, server_round, synthetic_client(cfg, pid, **kw))

    return make


def server(of: Config | ClientContext, server_round: int = 0, clients: int = 3) -> ServerContext:
    """A server context for strategy-level tests: ``clients`` training clients, the synthetic client's model.

    Given a client context, its model's input shape and classes; given a config, the synthetic
    client's defaults (1 x 28 x 28 images, 4 classes).
    """
    if isinstance(of, ClientContext):
        cfg, shape, classes = of.cfg, of.data.in_shape, of.data.num_classes
    else:
        cfg, shape, classes = of, (1, 28, 28), 4
    m = cfg.model
    factory = partial(build_model, m.name, shape, classes, m.embedding_dim, cfg.seed)
    return ServerContext(cfg, server_round, tuple(range(clients)), factory)


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: list[str] | None = None) -> bool:
    """Bit-for-bit equality of two state dicts on ``keys`` (default: all of ``a``'s)."""
    return all(np.array_equal(a[k], b[k]) for k in (a if keys is None else keys))


def saved(ctx: ClientContext, name: str) -> dict[str, np.ndarray]:
    """The client's saved file ``name`` as numpy arrays (it must exist)."""
    state = ctx.load(name)
    assert state is not None, f"client {ctx.pid} saved no {name!r}"
    return {k: v.numpy().copy() for k, v in state.items()}
