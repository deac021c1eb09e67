from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from torch.nn import functional as F

from fedmem.strategy import ClientContext, Reply, Strategy, get_weights
from fedmem.updates import Arrays
from strategies.fedavg import FedAvg
from strategies.scaffold import Scaffold
from tests.strategies.conftest import server

Make = Callable[..., ClientContext]


def _round(
    strategy: Strategy, state: Arrays, r: int, make_ctx: Make, opts: tuple[str, ...], clients: int = 3
) -> Arrays:
    """One round with clients 0-2 of ``clients`` (identical data: the synthetic client ignores pid)."""
    sent = strategy.broadcast(state, r)
    replies = []
    for pid in range(3):
        ctx = dataclasses.replace(make_ctx(*opts, pid=pid, server_round=r, n=20), received=sent)
        update = strategy.fit(ctx.model_from(sent["model"]), ctx)
        replies.append(Reply(pid, update.num_examples, update.arrays, update.metrics))
    new, _ = strategy.aggregate(state, replies, server(strategy.cfg, r, clients))
    return new


@pytest.mark.parametrize("num_clients", [3, 6])
def test_identical_clients_make_scaffold_fedavg(num_clients: int, make_ctx: Make) -> None:
    # full-batch steps: every client computes the same gradients, so c = c_i once all take part
    opts = ("model.embedding_dim=8", "strategy.batch_size=20", "strategy.local_steps=2", "strategy.lr=0.05")
    cfg = make_ctx(*opts, "strategy.momentum=0.0").cfg
    scaffold, fedavg = Scaffold(cfg), FedAvg(cfg)
    x0 = get_weights(make_ctx(*opts).new_model())
    s_state, f_state = scaffold.init(x0, server(make_ctx(*opts))), fedavg.init(x0, server(cfg))
    closeness = []
    for r in (1, 2):
        s_state = _round(scaffold, s_state, r, make_ctx, opts, num_clients)
        f_state = _round(fedavg, f_state, r, make_ctx, (*opts, "strategy.momentum=0.0"), num_clients)
        closeness.append(
            all(np.allclose(s_state["model"][k], f_state["model"][k], rtol=1e-5, atol=1e-7) for k in x0)
        )
        assert any(np.abs(c).max() > 1e-3 for c in s_state["c"].values())
    # round 1 (c = c_i = 0) is FedAvg; in round 2 a full federation (c = c_i) still is, while with
    # half of it absent (c = c_i / 2) the correction must change the result
    assert closeness == [True, num_clients == 3]


def test_control_variate_is_the_gradient_at_x_for_a_tiny_lr(make_ctx: Make) -> None:
    opts = ("model.embedding_dim=8", "strategy.batch_size=20", "strategy.local_steps=2", "strategy.lr=1e-6")
    ctx = make_ctx(*opts, n=20)
    d = ctx.data
    data = dataclasses.replace(d, x_train=d.x_train.double())
    model = ctx.new_model().double()  # float64: (x - y) / (K * eta) with eta = 1e-6 cancels in float32
    x = get_weights(model)
    strategy = Scaffold(ctx.cfg)
    ctx = dataclasses.replace(ctx, data=data, received=strategy.init(x, server(ctx)))
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(data.x_train), data.y_train).backward()
    update = strategy.fit(model, ctx)
    for name, p in reference.named_parameters():
        assert p.grad is not None
        np.testing.assert_allclose(update.arrays["c_delta"][name], p.grad.numpy(), rtol=1e-3, atol=1e-7)


def test_c_delta_travels_and_c_i_stays_with_the_client(make_ctx: Make) -> None:
    opts = ("model.name='cnn_bn'", "model.embedding_dim=8", "strategy.lr=0.05")
    ctx = make_ctx(*opts)
    strategy = Scaffold(ctx.cfg)
    model = ctx.new_model()
    params = [k for k, _ in model.named_parameters()]
    state = strategy.init(get_weights(model), server(ctx))
    assert sorted(state["c"]) == sorted(params)  # parameters only: no running statistics
    assert not any("running" in k for k in params)
    assert set(strategy.broadcast(state, 1)) == {"model", "c"}
    ctx = dataclasses.replace(ctx, received=state)
    update = strategy.fit(ctx.model_from(state["model"]), ctx)
    assert set(update.arrays) == {"model", "c_delta"} and sorted(update.arrays["c_delta"]) == sorted(params)
    c_1 = ctx.load("scaffold_c")
    assert c_1 is not None
    for k in params:  # first participation: c_i was 0
        np.testing.assert_array_equal(update.arrays["c_delta"][k], c_1[k].numpy())
    # round 2 with a non-zero server c: the upload is the change of c_i, not c_i itself
    c = {k: np.full_like(v, 0.01) for k, v in state["c"].items()}
    ctx2 = dataclasses.replace(make_ctx(*opts, server_round=2), received={**state, "c": c})
    update2 = strategy.fit(ctx2.model_from(state["model"]), ctx2)
    c_2 = ctx2.load("scaffold_c")
    assert c_2 is not None
    for k in params:
        np.testing.assert_allclose(update2.arrays["c_delta"][k], (c_2[k] - c_1[k]).numpy(), rtol=0, atol=1e-6)
    assert any(not np.allclose(c_2[k].numpy(), update2.arrays["c_delta"][k]) for k in params)


def test_server_update_by_hand(make_ctx: Make) -> None:
    strategy = Scaffold(make_ctx("strategy.scaffold.server_lr=0.5").cfg)
    state: Arrays = {"model": {"w": np.array([1.0, 2.0])}, "c": {"w": np.array([0.5, 0.0])}}
    replies = [
        Reply(0, 1, {"model": {"w": np.array([3.0, 2.0])}, "c_delta": {"w": np.array([1.0, 2.0])}}, {}),
        Reply(1, 3, {"model": {"w": np.array([1.0, 6.0])}, "c_delta": {"w": np.array([3.0, -4.0])}}, {}),
    ]
    new, metrics = strategy.aggregate(state, replies, server(strategy.cfg, 1, clients=4))
    # weighted mean of models (1.5, 5); x + 0.5 * ((1.5, 5) - (1, 2)) = (1.25, 3.5)
    np.testing.assert_array_equal(new["model"]["w"], [1.25, 3.5])
    # c + 2/4 * mean((1, 2), (3, -4)) = (0.5, 0) + 0.5 * (2, -1) = (1.5, -0.5)
    np.testing.assert_array_equal(new["c"]["w"], [1.5, -0.5])
    assert metrics["c_norm"] == pytest.approx(np.hypot(1.5, 0.5))
