from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedmem.server_optimizers import adam_second_moment, momentum_step, yogi_second_moment
from fedmem.strategy import ClientContext, Reply, Strategy, get_weights
from fedmem.updates import Weights
from strategies.fedadam import FedAdam
from strategies.fedavgm import FedAvgM
from strategies.fedyogi import FedYogi
from tests.strategies.conftest import server

X = np.array([1.0, 2.0, -1.0])


def _reply(pid: int, n: int, w: np.ndarray, counter: int) -> Reply:
    return Reply(pid, n, {"model": {"w": w, "n": np.array(counter, np.int64)}}, {})


def _weights(w: np.ndarray, counter: int = 0) -> Weights:
    return {"w": w, "n": np.array(counter, np.int64)}


def test_fedadam_without_memory_is_a_normalised_step(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(
        "strategy.fedadam.beta1=0.0",
        "strategy.fedadam.beta2=0.0",
        "strategy.fedadam.server_lr=0.5",
        "strategy.fedadam.tau=0.001",
    )
    strategy = FedAdam(ctx.cfg)
    state = strategy.init(_weights(X), server(strategy.cfg))
    assert set(state) == {"model", "server/m", "server/v"} and set(state["server/m"]) == {"w"}
    # weighted average 0.25 * a + 0.75 * b = X + delta with delta = (0.5, -0.25, 2)
    delta = np.array([0.5, -0.25, 2.0])
    a, b = X + np.array([2.0, -1.0, 0.0]), X + np.array([0.0, 0.0, 8.0 / 3.0])
    replies = [_reply(0, 1, a, 7), _reply(1, 3, b, 9)]
    new, metrics = strategy.aggregate(state, replies, server(strategy.cfg, 1))
    np.testing.assert_allclose(0.25 * a + 0.75 * b, X + delta, rtol=0, atol=1e-15)
    avg_delta = (0.25 * a + 0.75 * b) - X
    np.testing.assert_array_equal(new["model"]["w"], X + 0.5 * avg_delta / (np.abs(avg_delta) + 0.001))
    assert new["model"]["n"] == 7  # integer buffers come from the average, not the optimizer
    np.testing.assert_array_equal(new["server/m"]["w"], avg_delta)
    np.testing.assert_array_equal(new["server/v"]["w"], avg_delta**2)
    assert metrics["pseudo_grad_norm"] == pytest.approx(np.linalg.norm(delta))


def test_yogi_second_moment_by_hand_both_signs() -> None:
    v = np.array([1.0, 0.25, 0.25])
    delta = np.array([0.5, 1.0, -0.5])  # delta^2 = (0.25, 1, 0.25): v above, below, equal
    # v - (1 - 0.5) * delta^2 * sign(v - delta^2)
    np.testing.assert_array_equal(yogi_second_moment(v, delta, 0.5), [0.875, 0.75, 0.25])
    np.testing.assert_array_equal(adam_second_moment(v, delta, 0.5), [0.625, 0.625, 0.25])


def test_fedyogi_uses_the_yogi_rule_and_fedadam_the_adam_rule(make_ctx: Callable[..., ClientContext]) -> None:
    got = {}
    for cls in (FedAdam, FedYogi):
        ctx = make_ctx(f"strategy.{cls.name}.beta2=0.5", f"strategy.{cls.name}.beta1=0.0")
        strategy = cls(ctx.cfg)
        state = {
            **strategy.init(_weights(X), server(strategy.cfg)),
            "server/v": {"w": np.array([1.0, 0.25, 0.25])},
        }
        new, _ = strategy.aggregate(
            state, [_reply(0, 5, X + np.array([0.5, 1.0, -0.5]), 0)], server(strategy.cfg, 1)
        )
        got[cls.name] = new["server/v"]["w"]
    np.testing.assert_array_equal(got["fedyogi"], [0.875, 0.75, 0.25])
    np.testing.assert_array_equal(got["fedadam"], [0.625, 0.625, 0.25])


def test_fedavgm_without_momentum_is_fedavg(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("strategy.fedavgm.server_momentum=0.0", "model.name='cnn_bn'", "model.embedding_dim=8")
    x = get_weights(ctx.new_model())
    rng = np.random.default_rng(0)
    strategy = FedAvgM(ctx.cfg)
    state, reference = strategy.init(x, server(strategy.cfg)), {"model": x}
    for r in (1, 2):
        uploads = [
            {k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in x.items()} for _ in range(3)
        ]
        replies = [
            Reply(i, n, {"model": u}, {}) for i, (u, n) in enumerate(zip(uploads, (10, 20, 35), strict=True))
        ]
        state, _ = strategy.aggregate(state, replies, server(strategy.cfg, r))
        reference, _ = Strategy(ctx.cfg).aggregate(reference, replies, server(ctx.cfg, r))
        for k, v in reference["model"].items():
            np.testing.assert_array_equal(state["model"][k], v, err_msg=k)


def test_fedavgm_two_rounds_of_momentum_by_hand(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("strategy.fedavgm.server_momentum=0.9", "strategy.fedavgm.server_lr=0.5")
    strategy = FedAvgM(ctx.cfg)
    state = strategy.init(_weights(np.array([0.0, 4.0])), server(strategy.cfg))
    # round 1: delta = (1, -2), m = (1, -2), x = (0.5, 3)
    state, _ = strategy.aggregate(state, [_reply(0, 1, np.array([1.0, 2.0]), 3)], server(strategy.cfg, 1))
    np.testing.assert_allclose(state["model"]["w"], [0.5, 3.0], rtol=1e-15)
    # round 2: delta = (-0.5, 1), m = 0.9 * (1, -2) + (-0.5, 1) = (0.4, -0.8), x = (0.7, 2.6)
    state, _ = strategy.aggregate(state, [_reply(0, 1, np.array([0.0, 4.0]), 4)], server(strategy.cfg, 2))
    np.testing.assert_allclose(state["server/m"]["w"], [0.4, -0.8], rtol=1e-14)
    np.testing.assert_allclose(state["model"]["w"], [0.7, 2.6], rtol=1e-14)
    assert state["model"]["n"] == 4
    # the pure function agrees, and keeps the moment's dtype
    x, m = momentum_step(
        {"w": np.array([0.5, 3.0], np.float32)},
        {"w": np.array([0.0, 4.0], np.float32)},
        {"w": np.array([1.0, -2.0], np.float32)},
        server_lr=0.5,
        momentum=0.9,
    )
    assert m["w"].dtype == np.float32 and x["w"].dtype == np.float32
    np.testing.assert_allclose(x["w"], [0.7, 2.6], rtol=1e-6)


@pytest.mark.parametrize("cls", [FedAvgM, FedAdam, FedYogi])
def test_server_moments_never_travel(cls: type[Strategy], make_ctx: Callable[..., ClientContext]) -> None:
    strategy = cls(make_ctx().cfg)
    state = strategy.init(_weights(X), server(strategy.cfg))
    assert "server/m" in state
    for r in (1, 2):
        assert set(strategy.broadcast(state, r)) == {"model"}
        state, _ = strategy.aggregate(state, [_reply(0, 2, X + 1.0, 0)], server(strategy.cfg, r))
        assert "server/m" in state and not np.array_equal(state["server/m"]["w"], 0 * X)
