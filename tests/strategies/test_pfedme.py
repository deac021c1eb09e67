from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedmem.errors import ConfigError
from fedmem.strategy import PERSONAL, ClientContext, Reply, get_weights
from strategies.fedavg import FedAvg
from strategies.pfedme import PFedMe
from tests.strategies.conftest import saved, server

# one mini-batch of 8, plain SGD: FedAvg's reply is then exactly w - eta * grad f(w) on that batch
ONE_SGD_STEP = (
    "model.embedding_dim=8",
    "strategy.local_steps=1",
    "strategy.momentum=0.0",
    "strategy.batch_size=8",
    "strategy.lr=0.05",
)


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_one_inner_step_with_lam_times_personal_lr_one_is_an_sgd_step(
    make_ctx: Callable[..., ClientContext],
) -> None:
    # K = 1 from theta = w: theta = w - s grad f(w) (the proximal term is 0), then
    # w <- w - eta lam (w - theta) = w - eta lam s grad f(w) = w - eta grad f(w) for lam s = 1.
    opts = ("strategy.pfedme.lam=2.0", "strategy.pfedme.personal_lr=0.5", "strategy.pfedme.inner_steps=1")
    ctx = make_ctx(*ONE_SGD_STEP, *opts)
    update = PFedMe(ctx.cfg).fit(ctx.new_model(), ctx)
    sgd = FedAvg(ctx.cfg).fit(ctx.new_model(), ctx).arrays["model"]
    for k, v in sgd.items():
        np.testing.assert_allclose(update.arrays["model"][k], v, rtol=1e-5, atol=1e-6)
    # and theta itself is one SGD step of size s = 0.5 on the same batch
    big = make_ctx(*ONE_SGD_STEP[:-1], "strategy.lr=0.5")  # same client and round: same batch
    theta_sgd = FedAvg(big.cfg).fit(big.new_model(), big).arrays["model"]
    theta = saved(ctx, PERSONAL)
    for k, v in theta_sgd.items():
        np.testing.assert_allclose(theta[k], v, rtol=1e-5, atol=1e-6)


def test_large_lam_approaches_one_fedavg_sgd_step(make_ctx: Callable[..., ClientContext]) -> None:
    # With personal_lr = 1 / (2 lam) the inner problem contracts by ~1/2 per step, so K = 12 solves
    # it; its solution is w - grad f(w) / lam + O(1 / lam^2), and the w update tends to an SGD step.
    ctx = make_ctx(*ONE_SGD_STEP)
    w0 = get_weights(ctx.new_model())
    sgd = FedAvg(ctx.cfg).fit(ctx.new_model(), ctx).arrays["model"]
    step = _distance(sgd, w0)
    relative = []
    for lam in (100.0, 1000.0, 10000.0):
        opts = (f"strategy.pfedme.lam={lam}", f"strategy.pfedme.personal_lr={1 / (2 * lam)}")
        c = make_ctx(*ONE_SGD_STEP, *opts, "strategy.pfedme.inner_steps=12")
        relative.append(_distance(PFedMe(c.cfg).fit(c.new_model(), c).arrays["model"], sgd) / step)
    assert relative[0] > relative[1] > relative[2]
    assert relative[2] < 1e-2  # float32 rounding of theta - w dominates beyond lam ~ 1e5


def test_beta_mixes_the_old_state_with_the_average_by_hand(make_ctx: Callable[..., ClientContext]) -> None:
    state = {"model": {"a": np.array([1.0, 1.0], np.float32), "n": np.array(7)}}
    replies = [
        Reply(0, 1, {"model": {"a": np.array([1.0, 2.0], np.float32), "n": np.array(1)}}, {}),
        Reply(1, 3, {"model": {"a": np.array([3.0, 6.0], np.float32), "n": np.array(2)}}, {}),
    ]
    half = PFedMe(make_ctx("strategy.pfedme.beta=0.5").cfg)
    new, _ = half.aggregate(state, replies, server(half.cfg, 1))
    # average (1 * [1, 2] + 3 * [3, 6]) / 4 = [2.5, 5]; 0.5 * [1, 1] + 0.5 * [2.5, 5] = [1.75, 3]
    np.testing.assert_array_equal(new["model"]["a"], np.array([1.75, 3.0], np.float32))
    assert new["model"]["a"].dtype == np.float32 and new["model"]["n"] == 1  # integer: first reply's
    one = PFedMe(make_ctx().cfg)
    fedavg, _ = FedAvg(one.cfg).aggregate(state, replies, server(one.cfg, 1))
    np.testing.assert_array_equal(
        one.aggregate(state, replies, server(one.cfg, 1))[0]["model"]["a"], fedavg["model"]["a"]
    )


def test_theta_is_the_predictor_and_cold_start_saves_nothing(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("model.embedding_dim=8")
    strategy = PFedMe(ctx.cfg)
    assert strategy.reports_global and strategy.label == "pfedme"
    cold = get_weights(strategy.client_model(ctx.new_model(), ctx))
    assert ctx.load(PERSONAL) is None
    update = strategy.fit(ctx.new_model(), ctx)
    theta = saved(ctx, PERSONAL)
    assert cold.keys() == theta.keys() and all(np.array_equal(cold[k], theta[k]) for k in cold)
    assert list(update.arrays) == ["model"] and _distance(update.arrays["model"], theta) > 0
    deployed = get_weights(strategy.client_model(ctx.model_from(update.arrays["model"]), ctx))
    assert all(np.array_equal(deployed[k], theta[k]) for k in theta)


def test_inner_steps_must_be_positive(make_ctx: Callable[..., ClientContext]) -> None:
    with pytest.raises(ConfigError, match="inner_steps"):
        PFedMe(make_ctx("strategy.pfedme.inner_steps=0").cfg)
