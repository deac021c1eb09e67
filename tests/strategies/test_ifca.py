from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedmem.models import build_model
from fedmem.strategy import ClientContext, ClientData, Reply, get_weights
from fedmem.updates import Arrays
from strategies.fedavg import FedAvg
from strategies.ifca import Ifca, pick_cluster
from tests.strategies.conftest import server

SMALL = "model.embedding_dim=8"


def _clusters(ctx: ClientContext, k: int) -> Arrays:
    """What ``Ifca.init`` builds (independent initialisations keyed ("ifca", k)), without a data set."""
    m = ctx.cfg.model
    shape, classes = ctx.data.in_shape, ctx.data.num_classes
    return {
        f"cluster/{i}": get_weights(
            build_model(m.name, shape, classes, m.embedding_dim, ctx.cfg.seed, "ifca", i)
        )
        for i in range(k)
    }


def _constant_head(ctx: ClientContext, bias: list[float]) -> dict[str, np.ndarray]:
    """A model whose logits are ``bias`` for every input (zero classifier weights)."""
    w = get_weights(ctx.new_model())
    w["classifier.weight"] = np.zeros_like(w["classifier.weight"])
    w["classifier.bias"] = np.asarray(bias, np.float32)
    return w


def test_pick_cluster_takes_the_lowest_loss_and_the_lowest_index_on_ties() -> None:
    assert pick_cluster([0.7, 0.2, 0.5]) == 1
    assert pick_cluster([0.3, 0.3, 0.1, 0.1]) == 2
    assert pick_cluster([0.4, 0.4]) == 0
    assert pick_cluster([math.nan, math.nan]) == 0


def test_client_picks_trains_and_uploads_the_cluster_of_lowest_loss(
    make_ctx: Callable[..., ClientContext],
) -> None:
    base = make_ctx(SMALL, "strategy.ifca.clusters=3")
    d = base.data
    twos = torch.full_like(d.y_train, 2)  # every train label is class 2
    data = ClientData(d.pid, d.seen, d.num_classes, d.x_train, twos, d.x_val, d.y_val)
    uniform = _constant_head(base, [0.0, 0.0, 0.0, 0.0])  # loss log 4 on every example
    right = _constant_head(base, [0.0, 0.0, 2.0, 0.0])  # loss log(3 + e^2) - 2
    received = {"cluster/0": uniform, "cluster/1": right, "cluster/2": right}
    ctx = ClientContext(base.cfg, 0, 1, data, received)
    strategy = Ifca(ctx.cfg)
    j, losses = strategy.choose(ctx.new_model(), ctx)
    assert j == 1  # clusters 1 and 2 tie: the lowest index
    np.testing.assert_allclose(
        losses, [math.log(4), math.log(3 + math.e**2) - 2, math.log(3 + math.e**2) - 2]
    )
    update = strategy.fit(ctx.new_model(), ctx)
    assert list(update.arrays) == ["cluster/1"] and update.metrics["cluster"] == 1.0
    oracle = ctx.model_from(right)  # fit trains exactly the chosen model with the local schedule
    FedAvg(ctx.cfg).fit(oracle, ctx)
    want = get_weights(oracle)
    assert all(np.array_equal(update.arrays["cluster/1"][k], want[k]) for k in want)
    deployed = get_weights(strategy.client_model(ctx.new_model(), ctx))
    assert all(np.array_equal(deployed[k], right[k]) for k in right)


def test_aggregate_averages_each_cluster_over_its_clients(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(SMALL, "strategy.ifca.clusters=3")
    strategy = Ifca(ctx.cfg)
    state = _clusters(ctx, 3)
    key = "conv.0.weight"

    def shifted(k: int, by: float) -> dict[str, np.ndarray]:
        return {n: v + by for n, v in state[f"cluster/{k}"].items()}

    replies = [
        Reply(0, 10, {"cluster/0": shifted(0, 1.0)}, {}),
        Reply(1, 30, {"cluster/0": shifted(0, 5.0)}, {}),
        Reply(2, 20, {"cluster/2": shifted(2, 3.0)}, {}),
    ]
    new, metrics = strategy.aggregate(state, replies, server(strategy.cfg, 1))
    assert metrics == {"clients/cluster_0": 2.0, "clients/cluster_1": 0.0, "clients/cluster_2": 1.0}
    np.testing.assert_allclose(new["cluster/0"][key], state["cluster/0"][key] + 4.0, atol=1e-5)  # (10+150)/40
    np.testing.assert_allclose(new["cluster/2"][key], state["cluster/2"][key] + 3.0, atol=1e-5)
    assert all(np.array_equal(new["cluster/1"][n], v) for n, v in state["cluster/1"].items())


def _group_client(pid: int, group: int, prototypes: torch.Tensor, n: int = 60) -> ClientData:
    """8x8 inputs: a class prototype plus noise; labels: the class (group 0) or class + 1 mod 4 (group 1)."""
    g = torch.Generator().manual_seed(100 + pid)

    def part(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.randint(0, 4, (size,), generator=g)
        x = prototypes[c] + 0.5 * torch.randn(size, 1, 8, 8, generator=g)
        return x, (c + group) % 4

    (a, b), (c, d) = part(n), part(n // 2)
    return ClientData(pid, True, 4, a, b, c, d)


def test_ifca_recovers_two_groups_of_clients(make_ctx: Callable[..., ClientContext]) -> None:
    # Six clients share the inputs' distribution but group 1's labels are group 0's shifted by one
    # class, so no single model fits both. IFCA's outcome depends on the random initialisation (the
    # paper's guarantee assumes a good one); with this setup every seed 0..9 recovered the groups
    # when this test was written (round-1 assignments were often mixed, then sorted themselves out
    # by round 2-4), and the test pins seed 0. It fails on a collapsed assignment (one cluster for
    # all) and on any mixed one.
    cfg = make_ctx(SMALL, "strategy.lr=0.05", "strategy.local_epochs=2", "seed=0").cfg
    prototypes = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    groups = [0, 1, 0, 1, 0, 1]
    clients = [_group_client(pid, g, prototypes) for pid, g in enumerate(groups)]
    strategy = Ifca(cfg)
    state = _clusters(ClientContext(cfg, 0, 0, clients[0]), 2)
    for r in range(1, 5):
        replies = []
        for d in clients:
            ctx = ClientContext(cfg, d.pid, r, d, strategy.broadcast(state, r))
            u = strategy.fit(ctx.new_model(), ctx)
            replies.append(Reply(d.pid, u.num_examples, u.arrays, u.metrics))
        state, metrics = strategy.aggregate(state, replies, server(strategy.cfg, r))
        assert sum(metrics.values()) == 6
    final = []
    for d in clients:
        ctx = ClientContext(cfg, d.pid, 5, d, state)
        final.append(strategy.choose(ctx.new_model(), ctx)[0])
    assert sorted(set(final)) == [0, 1]
    assert all((final[i] == final[j]) == (groups[i] == groups[j]) for i in range(6) for j in range(6))
