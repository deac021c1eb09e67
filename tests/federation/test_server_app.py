"""How a session sizes its Flower nodes (each serves several clients once clients outnumber them)."""

from __future__ import annotations

from collections.abc import Callable

from fedmem.config import Config
from fedmem.federation.server_app import NODES_PER_ACTOR, supernodes


def test_one_node_per_client_until_the_actors_have_enough_messages(
    tiny_config: Callable[..., Config],
) -> None:
    cfg = tiny_config("runtime.num_cpus=2", "runtime.cpus_per_client=1")
    assert supernodes(cfg, 4) == 4
    assert supernodes(cfg, 5000) == 2 * NODES_PER_ACTOR
    assert (
        supernodes(tiny_config("runtime.num_cpus=4", "runtime.cpus_per_client=2"), 5000)
        == 2 * NODES_PER_ACTOR
    )
    assert supernodes(cfg, 5000, actors=10) == 10 * NODES_PER_ACTOR  # a Ray cluster's actors
