from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fedmem.config import Config
from fedmem.errors import ConfigError
from fedmem.strategy import ClientContext, get_weights
from strategies import STRATEGIES
from strategies.mrperfedavg import BOTTLENECK, LOG_SIGMA, MRPerFedAvg, kl_activations, kl_weights
from strategies.perfedavg import PerFedAvg
from tests.strategies.conftest import same, server


def _received(strategy: MRPerFedAvg, ctx: ClientContext) -> ClientContext:
    """``ctx`` holding what the server broadcasts in round 1 (model and the regularizer's arrays)."""
    state = strategy.init(get_weights(ctx.new_model()), server(strategy.cfg))
    return ClientContext(ctx.cfg, ctx.pid, ctx.round, ctx.data, strategy.broadcast(state, 1))


def test_weight_kl_against_the_closed_form_and_torch() -> None:
    mu = [torch.tensor([0.5, -1.0]), torch.tensor([[0.0]])]
    log_sigma = [torch.log(torch.tensor([0.2, 1.5])), torch.tensor([[0.0]])]
    prior = 2.0
    # log(prior / sigma) + (sigma^2 + mu^2) / (2 prior^2) - 1/2, summed
    by_hand = sum(
        math.log(prior / s) + (s * s + m * m) / (2 * prior**2) - 0.5
        for m, s in [(0.5, 0.2), (-1.0, 1.5), (0.0, 1.0)]
    )
    value = kl_weights(mu, log_sigma, prior)
    assert value.item() == pytest.approx(by_hand, rel=1e-6)
    oracle = sum(
        kl_divergence(Normal(m, s.exp()), Normal(0.0, prior)).sum()
        for m, s in zip(mu, log_sigma, strict=True)
    )
    assert value.item() == pytest.approx(float(oracle), rel=1e-6)


def test_activation_kl_against_torch_with_a_position_axis() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)  # (B, D, positions)
    scale = torch.rand(3, 4, 5, generator=g, dtype=torch.float64) + 0.1
    # summed over the D axis, averaged over the 3 x 5 (example, position) pairs
    oracle = kl_divergence(Normal(mean, scale), Normal(0.0, 1.0)).sum(dim=1).mean()
    assert kl_activations(mean, scale).item() == pytest.approx(oracle.item(), rel=1e-12)
    # N(0, 1) against itself
    assert kl_activations(torch.zeros(2, 3), torch.ones(2, 3)).item() == 0.0


@pytest.mark.parametrize("regularizer", ["weights", "activations"])
@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_no_noise_and_zero_beta_give_exactly_per_fedavg(
    make_ctx: Callable[..., ClientContext], regularizer: str, variant: str
) -> None:
    shared = ("strategy.local_steps=3", "model.embedding_dim=8")
    base = make_ctx(*shared, f"strategy.perfedavg.variant={variant}", n=40)
    expected = PerFedAvg(base.cfg).fit(base.new_model(), base).arrays["model"]
    mr_ctx = make_ctx(
        *shared,
        f"strategy.mrperfedavg.variant={variant}",
        f"strategy.mrperfedavg.regularizer={regularizer}",
        "strategy.mrperfedavg.beta_kl=0.0",
        "strategy.mrperfedavg.sample=false",
        n=40,
    )
    mr = MRPerFedAvg(mr_ctx.cfg)
    update = mr.fit(mr_ctx.new_model(), _received(mr, mr_ctx))
    assert same(update.arrays["model"], expected)
    noisy_ctx = make_ctx(*shared, f"strategy.mrperfedavg.regularizer={regularizer}", n=40)
    noisy = MRPerFedAvg(noisy_ctx.cfg)
    assert not same(noisy.fit(noisy_ctx.new_model(), _received(noisy, noisy_ctx)).arrays["model"], expected)


def test_without_noise_log_sigma_follows_the_kl_gradient_alone(
    make_ctx: Callable[..., ClientContext],
) -> None:
    beta, beta_kl, sigma, prior = 0.5, 0.1, 0.5, 2.0
    ctx = make_ctx(
        "strategy.local_steps=1",
        f"strategy.mrperfedavg.beta={beta}",
        f"strategy.mrperfedavg.beta_kl={beta_kl}",
        f"strategy.mrperfedavg.init_sigma={sigma}",
        f"strategy.mrperfedavg.prior_sigma={prior}",
        "strategy.mrperfedavg.sample=false",
    )
    strategy = MRPerFedAvg(ctx.cfg)
    update = strategy.fit(ctx.new_model(), _received(strategy, ctx))
    assert sorted(update.arrays[LOG_SIGMA]) == ["classifier.bias", "classifier.weight"]
    # d KL / d log_sigma = -1 + sigma^2 / prior^2; one SGD step of size beta
    expected = math.log(sigma) - beta * beta_kl * (-1 + sigma**2 / prior**2)
    for value in update.arrays[LOG_SIGMA].values():
        np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_sampling_is_seeded_by_client_and_round(make_ctx: Callable[..., ClientContext]) -> None:
    def upload(pid: int, server_round: int) -> dict[str, np.ndarray]:
        ctx = make_ctx(
            "strategy.local_steps=2",
            "strategy.mrperfedavg.init_sigma=0.1",
            pid=pid,
            server_round=server_round,
        )
        strategy = MRPerFedAvg(ctx.cfg)
        return strategy.fit(ctx.new_model(), _received(strategy, ctx)).arrays[LOG_SIGMA]

    first = upload(0, 1)  # synthetic clients all hold the same data: only the noise differs
    assert same(first, upload(0, 1))
    assert not same(first, upload(1, 1))
    assert not same(first, upload(0, 2))


def test_activation_bottleneck_starts_at_init_sigma_and_travels(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(
        "model.embedding_dim=8",
        "strategy.mrperfedavg.regularizer=activations",
        "strategy.mrperfedavg.init_sigma=0.05",
    )
    strategy = MRPerFedAvg(ctx.cfg)
    received = _received(strategy, ctx)
    start = received.received[BOTTLENECK]
    assert start["weight"].shape == (8, 8) and not start["weight"].any()
    assert np.allclose(np.log1p(np.exp(start["bias"])), 0.05)  # softplus(b) = init_sigma
    update = strategy.fit(ctx.new_model(), received)
    assert set(update.arrays) == {"model", BOTTLENECK}
    assert not same(update.arrays[BOTTLENECK], start)  # trained by the outer (query) loss


def test_bad_choices_are_refused(make_ctx: Callable[..., ClientContext]) -> None:
    with pytest.raises(
        ConfigError, match=r"strategy\.mrperfedavg\.regularizer must be one of weights, activations"
    ):
        MRPerFedAvg(make_ctx("strategy.mrperfedavg.regularizer=both").cfg)
    ctx = make_ctx("strategy.mrperfedavg.layers=['decoder']")
    with pytest.raises(ConfigError, match=r"layers names 'decoder'.*valid modules: classifier, conv.0"):
        MRPerFedAvg(ctx.cfg).fit(ctx.new_model(), ctx)


def test_layers_that_hold_no_parameters_are_refused_before_a_run(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx("strategy.mrperfedavg.layers=['decoder']")
    with pytest.raises(ConfigError, match=r"layers names 'decoder'.*valid modules: classifier, conv.0"):
        MRPerFedAvg(ctx.cfg).check(server(ctx))
    activations = make_ctx(
        "strategy.mrperfedavg.layers=['decoder']", "strategy.mrperfedavg.regularizer=activations"
    )
    MRPerFedAvg(activations.cfg).check(server(activations))  # MR-A makes no weights stochastic


def test_registered() -> None:
    assert STRATEGIES.get("mrperfedavg") is MRPerFedAvg


@pytest.mark.parametrize("regularizer", ["weights", "activations"])
def test_tiny_in_process_run(tiny_config: Callable[..., Config], regularizer: str) -> None:
    from fedmem.federation.sessions import run_on_engine

    cfg = tiny_config(
        "strategy.name=mrperfedavg",
        f"strategy.mrperfedavg.regularizer={regularizer}",
        "eval.personalizers=[]",
    )
    run = run_on_engine(cfg.with_runtime(engine="inprocess"))
    summary = run.summary()
    assert set(summary["accuracy"]) == {"global", "mrperfedavg"}
    assert all(0.1 < stats["mean"] <= 1.0 for stats in summary["unseen_accuracy"].values())
