"""``strategy.loss``: values and gradients by hand, RLL's symmetry, GCE's limits, every step uses it."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedmem.config import Config, StrategyConfig, load_config
from fedmem.errors import ConfigError
from fedmem.losses import (
    LOSSES,
    generalized_cross_entropy,
    loss_function,
    robust_log_loss,
    training_loss,
)
from fedmem.seeding import rng
from fedmem.strategy import MODEL, ClientContext, get_weights
from fedmem.training import SGDSettings, Step, cross_entropy_step, train
from tests.conftest import old_default_step
from tests.strategies.conftest import synthetic_client

P = np.array([0.5, 0.3, 0.2])  # softmax of log(P): a hand-checkable distribution over 3 classes


def _logits(p: np.ndarray = P) -> torch.Tensor:
    return torch.tensor(np.log(p), dtype=torch.float64).reshape(1, -1).requires_grad_(True)


def _value_and_grad(fn: Callable[..., torch.Tensor], y: int, **kw: float) -> tuple[float, np.ndarray]:
    z = _logits()
    loss = fn(z, torch.tensor([y]), **kw)
    loss.backward()
    assert z.grad is not None
    return float(loss.detach()), z.grad.numpy()[0]


def _softmax_jacobian(p: np.ndarray) -> np.ndarray:
    """d p_j / d z_k = p_j (delta_jk - p_k)."""
    return np.diag(p) - np.outer(p, p)


def test_cross_entropy_is_exactly_torchs() -> None:
    assert loss_function("ce") is F.cross_entropy
    assert training_loss(StrategyConfig()) is F.cross_entropy
    value, grad = _value_and_grad(loss_function("ce"), 0)
    assert value == pytest.approx(-math.log(0.5), abs=1e-12)
    assert np.allclose(grad, P - np.array([1.0, 0.0, 0.0]), atol=1e-12)


def test_robust_log_loss_value_and_gradient_by_hand() -> None:
    alpha = 0.1
    value, grad = _value_and_grad(robust_log_loss, 0, alpha=alpha)
    # log((a + 1) / a) - log(a + p_0) + (log(a + p_1) + log(a + p_2)) / (K - 1)
    expected = math.log(1.1 / 0.1) - math.log(0.6) + (math.log(0.4) + math.log(0.3)) / 2
    assert value == pytest.approx(expected, abs=1e-12)
    # dL/dp_j = c_j / (a + p_j), c = (-1, 1/2, 1/2); chain rule through the softmax
    dl_dp = np.array([-1.0, 0.5, 0.5]) / (alpha + P)
    assert np.allclose(grad, _softmax_jacobian(P).T @ dl_dp, atol=1e-12)
    # the loss is 0 at the one-hot prediction of the label
    z = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(robust_log_loss(z, torch.tensor([0]), alpha)) == pytest.approx(0.0, abs=1e-12)


def test_robust_log_loss_is_symmetric() -> None:
    """Its sum over all K labels is K log((alpha + 1) / alpha), whatever the logits."""
    g = torch.Generator().manual_seed(0)
    for alpha in (0.01, 0.1, 1.0):
        for scale in (0.1, 1.0, 10.0):
            z = scale * torch.randn(1, 5, generator=g, dtype=torch.float64)
            total = sum(float(robust_log_loss(z, torch.tensor([y]), alpha)) for y in range(5))
            assert total == pytest.approx(5 * math.log((alpha + 1) / alpha), abs=1e-10)
    # cross-entropy is not: the law above would catch a loss that lost its symmetric term
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ce = [float(F.cross_entropy(z, torch.tensor([y]))) for y in range(5)]
    z2 = torch.zeros(1, 5, dtype=torch.float64)
    ce2 = [float(F.cross_entropy(z2, torch.tensor([y]))) for y in range(5)]
    assert abs(sum(ce) - sum(ce2)) > 1.0


def test_generalized_cross_entropy_value_and_gradient_by_hand() -> None:
    q = 0.7
    value, grad = _value_and_grad(generalized_cross_entropy, 1, q=q)
    assert value == pytest.approx((1 - 0.3**q) / q, abs=1e-12)
    # dL/dz_k = -p_y^q (delta_ky - p_k)
    assert np.allclose(grad, -(0.3**q) * (np.array([0.0, 1.0, 0.0]) - P), atol=1e-12)


def test_generalized_cross_entropy_limits() -> None:
    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=g)
    p_y = torch.softmax(z, dim=1)[torch.arange(8), y]
    # q = 1: the mean of 1 - p_y (MAE up to a factor 2)
    assert float(generalized_cross_entropy(z, y, 1.0)) == pytest.approx(float((1 - p_y).mean()), abs=1e-12)
    # q -> 0: cross-entropy, with an error of order q (-log p_y)^2 / 2
    ce = float(F.cross_entropy(z, y))
    gaps = [abs(float(generalized_cross_entropy(z, y, q)) - ce) for q in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5


@pytest.mark.parametrize("name", LOSSES)
def test_text_logits_are_rows_like_cross_entropy(name: str) -> None:
    """(N, C, L) logits with (N, L) targets give the mean over every example and position."""
    fn = loss_function(name, alpha=0.3, q=0.5)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)  # N = 3, C = 6, L = 4
    y = torch.randint(0, 6, (3, 4), generator=g)
    rows = z.movedim(1, -1).reshape(-1, 6)
    assert float(fn(z, y)) == pytest.approx(float(fn(rows, y.reshape(-1))), abs=1e-12)


def test_a_bad_name_is_refused_with_the_choices() -> None:
    refusal = re.escape("strategy.loss = 'mae' is not known; valid choices: 'ce', 'rll', 'gce'")
    with pytest.raises(ConfigError, match=refusal):
        loss_function("mae")
    with pytest.raises(ConfigError, match=refusal):
        load_config("default", ["strategy.loss='mae'"])
    with pytest.raises(ConfigError, match=r"strategy.loss_q .* must be in \(0, 1\], got 0.0"):
        load_config("default", ["strategy.loss_q=0"])
    with pytest.raises(ConfigError, match=r"strategy.loss_q .* must be in \(0, 1\], got 1.5"):
        load_config("default", ["strategy.loss_q=1.5"])
    with pytest.raises(ConfigError, match=r"strategy.loss_alpha .* must be > 0, got 0.0"):
        load_config("default", ["strategy.loss_alpha=0"])


def _tiny_training(step: Step | None, loss: str = "ce") -> tuple[nn.Linear, float]:
    g = rng(0, "blobs")
    x = torch.tensor(g.normal(size=(64, 5)), dtype=torch.float32)
    y = torch.tensor(g.integers(0, 3, 64))
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    fn = training_loss(dataclasses.replace(StrategyConfig(), loss=loss))
    settings = SGDSettings(lr=0.5, momentum=0.9, epochs=2, batch_size=16)
    stats = train(model, x, y, settings, rng(0, "fit"), step=step or cross_entropy_step(None, loss_fn=fn))
    return model, stats.loss


def test_ce_gives_exactly_the_old_numbers_and_the_others_do_not() -> None:
    old, old_loss = _tiny_training(old_default_step)
    new, new_loss = _tiny_training(None)
    assert old_loss == new_loss
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters(), strict=True))
    for name in ("rll", "gce"):
        other, _ = _tiny_training(None, name)
        assert not torch.equal(other.weight, old.weight)


# Strategies with their own steps: with strategy.loss = "gce" and q = 1 the loss they report is
# 1 - p_y <= 1; cross-entropy on 4 classes at initialisation is about log 4 = 1.39 > 1.
OWN_STEPS = ["fedavg", "fedprox", "ditto", "apfl", "pfedme", "scaffold", "perfedavg", "mrperfedavg"]


def _ctx(tmp_path: Path, name: str, loss: str) -> tuple[Config, ClientContext]:
    cfg = load_config(
        "default",
        [
            f"strategy.name='{name}'",
            f"strategy.loss='{loss}'",
            "strategy.loss_q=1.0",
            "model.embedding_dim=8",
            f"runtime.run_dir='{tmp_path / loss}'",
        ],
    )
    ctx = ClientContext(cfg, 0, 1, synthetic_client(cfg, 0, n=40))
    weights = get_weights(ctx.new_model())
    received = {MODEL: weights}
    if name == "scaffold":
        received["c"] = {k: np.zeros_like(weights[k]) for k, _ in ctx.new_model().named_parameters()}
    return cfg, dataclasses.replace(ctx, received=received)


@pytest.mark.parametrize("name", OWN_STEPS)
def test_every_strategy_step_trains_with_the_configured_loss(tmp_path: Path, name: str) -> None:
    from strategies import STRATEGIES

    losses = {}
    for loss in ("ce", "gce"):
        cfg, ctx = _ctx(tmp_path, name, loss)
        update = STRATEGIES.get(name)(cfg).fit(ctx.new_model(), ctx)
        losses[loss] = {k: v for k, v in update.metrics.items() if "loss" in k}
    assert losses["gce"] and all(v <= 1.0 for v in losses["gce"].values()), losses
    assert all(v > 1.0 for v in losses["ce"].values()), losses


def test_fine_tuning_and_adaptation_use_the_configured_loss(tmp_path: Path) -> None:
    from strategies import STRATEGIES

    for name, key in (("finetune", "loss"), ("perfedavg", "adapt_loss")):
        for loss, ok in (("ce", lambda v: v > 1.0), ("gce", lambda v: v <= 1.0)):
            cfg, ctx = _ctx(tmp_path, name, loss)
            predictor = STRATEGIES.get(name)(cfg).personalize(ctx.new_model(), ctx)
            assert ok(predictor.info[key]), (name, loss, predictor.info)


@pytest.mark.parametrize("loss", ["rll", "gce"])
def test_a_tiny_federation_with_each_loss_completes(tiny_config: Callable[..., Config], loss: str) -> None:
    from fedmem.federation.sessions import run_on_engine

    cfg = tiny_config(f"strategy.loss='{loss}'", "rounds=1", "eval.personalizers=['finetune']")
    run = run_on_engine(cfg.with_runtime(engine="inprocess"))
    summary = run.summary()
    assert set(summary["accuracy"]) == {"global", "finetune"}
    assert all(0 <= s["mean"] <= 1 for s in summary["accuracy"].values())
    (line,) = run.metrics()
    assert math.isfinite(line["train_loss"])
    if loss == "gce":
        assert line["train_loss"] <= 1 / cfg.strategy.loss_q  # GCE is bounded by 1 / q
