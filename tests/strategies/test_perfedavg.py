from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedmem.config import Config
from fedmem.errors import ConfigError
from fedmem.strategy import ClientContext, ModelPredictor, Reply, get_weights
from fedmem.training import Batch, Draw
from strategies import STRATEGIES
from strategies.perfedavg import PerFedAvg, batch_loss, hessian_vector, meta_gradient
from tests.strategies.conftest import same, server


def _ce_grad(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of the mean cross-entropy of logits x w^T + b, by hand: (softmax - onehot) x / B."""
    z = x @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    r = (p - np.eye(w.shape[0])[y]) / len(y)
    return r.T @ x, r.sum(axis=0)


def _always(batch: Batch) -> Draw:
    """A draw that returns ``batch`` every time (D' fixed by hand)."""
    return lambda: batch


def _linear(w: np.ndarray, b: np.ndarray) -> nn.Linear:
    model = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
        model.bias.copy_(torch.from_numpy(b))
    return model


def test_first_order_round_of_two_clients_by_hand(make_ctx: Callable[..., ClientContext]) -> None:
    alpha, beta = 0.5, 0.25
    ctx = make_ctx(f"strategy.perfedavg.alpha={alpha}", f"strategy.perfedavg.beta={beta}")
    strategy = PerFedAvg(ctx.cfg)
    w0 = np.array([[0.2, -0.1], [0.0, 0.3], [-0.4, 0.1]], np.float32)  # 3 classes, 2 features
    b0 = np.array([0.1, 0.0, -0.1], np.float32)
    clients = {  # (D, D') of each client; D'' is not used by the first-order variant
        0: ((np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([0, 2])), (np.array([[1.0, 1.0]]), np.array([1]))),
        1: (
            (np.array([[-1.0, 0.5]]), np.array([2])),
            (np.array([[0.5, -1.0], [2.0, 0.0]]), np.array([0, 1])),
        ),
    }
    uploads, expected = [], []
    for pid, ((xs, ys), (xq, yq)) in clients.items():
        model = _linear(w0, b0)
        step = strategy.make_step(model, ctx)
        query: Batch = (torch.tensor(xq, dtype=torch.float32), torch.tensor(yq))
        optimizer = torch.optim.SGD(model.parameters(), lr=beta)
        step(model, (torch.tensor(xs, dtype=torch.float32), torch.tensor(ys)), _always(query), optimizer)
        uploads.append(Reply(pid, len(ys), {"model": get_weights(model)}, {}))
        # by hand: w~ = w - alpha grad f(w; D); w <- w - beta grad f(w~; D')
        gw, gb = _ce_grad(w0.astype(np.float64), b0.astype(np.float64), xs, ys)
        wt, bt = w0 - alpha * gw, b0 - alpha * gb
        hw, hb = _ce_grad(wt, bt, xq, yq)
        expected.append((w0 - beta * hw, b0 - beta * hb))
        np.testing.assert_allclose(uploads[-1].arrays["model"]["weight"], expected[-1][0], atol=1e-6)
        np.testing.assert_allclose(uploads[-1].arrays["model"]["bias"], expected[-1][1], atol=1e-6)
    state, _ = strategy.aggregate({"model": get_weights(_linear(w0, b0))}, uploads, server(strategy.cfg, 1))
    # FedAvg: weights 2 and 1 (the clients' support sizes stand in for their example counts)
    np.testing.assert_allclose(state["model"]["weight"], (2 * expected[0][0] + expected[1][0]) / 3, atol=1e-6)
    np.testing.assert_allclose(state["model"]["bias"], (2 * expected[0][1] + expected[1][1]) / 3, atol=1e-6)


def _small_problem() -> tuple[nn.Module, list[nn.Parameter], Batch]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    return model, list(model.parameters()), (x, torch.tensor([0, 1, 2, 1, 0]))


def _exact_hessian(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The full Hessian of the mean cross-entropy in the flattened parameters, by torch.autograd."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            parts[name] = v[start : start + size].reshape(shape)
            start += size
        return F.cross_entropy(functional_call(model, parts, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize(("delta", "atol"), [(0.0, 1e-12), (1e-4, 1e-6)])
def test_hessian_vector_product_against_the_exact_hessian(delta: float, atol: float) -> None:
    model, params, batch = _small_problem()
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    vector = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    hv = hessian_vector(params, batch_loss(model), batch, vector, delta)
    expected = _exact_hessian(model, batch) @ torch.cat([v.reshape(-1) for v in vector])
    assert torch.allclose(torch.cat([h.reshape(-1) for h in hv]), expected, atol=atol, rtol=0)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # w restored


def test_hessian_free_meta_gradient_is_g_minus_alpha_h_g() -> None:
    model, params, support = _small_problem()
    query: Batch = (support[0].flip(0), torch.tensor([2, 2, 1, 0, 0]))
    hessian: Batch = (support[0] * 0.5, torch.tensor([1, 0, 0, 2, 1]))
    alpha, loss = 0.3, batch_loss(model)
    first, _ = meta_gradient(params, loss, loss, (support, query, None), alpha, 0.0)
    hf, _ = meta_gradient(params, loss, loss, (support, query, hessian), alpha, 0.0)
    g = torch.cat([a.reshape(-1) for a in first])
    expected = g - alpha * _exact_hessian(model, hessian) @ g
    assert torch.allclose(torch.cat([a.reshape(-1) for a in hf]), expected, atol=1e-12, rtol=0)


def test_fit_runs_both_variants_and_personalize_adapts_a_copy(make_ctx: Callable[..., ClientContext]) -> None:
    for variant in ("fo", "hf"):
        ctx = make_ctx(f"strategy.perfedavg.variant={variant}", "strategy.perfedavg.adapt_steps=3", n=40)
        model, strategy = ctx.new_model(), PerFedAvg(ctx.cfg)
        received = get_weights(model)
        update = strategy.fit(model, ctx)
        assert update.num_examples == 40 and update.metrics["steps"] == 2.0
        assert not same(update.arrays["model"], received)
        before = get_weights(model)
        predictor = strategy.personalize(model, ctx)
        assert same(get_weights(model), before)  # the meta-model is untouched
        assert predictor.info["adapt_loss"] > 0
        x = ctx.data.x_val
        assert not np.allclose(predictor.predict(x), ModelPredictor(model).predict(x))


def test_bad_variant_is_refused(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("strategy.name=perfedavg", "strategy.perfedavg.variant=maml")
    with pytest.raises(ConfigError, match=r"strategy\.perfedavg\.variant must be one of fo, hf"):
        PerFedAvg(ctx.cfg)


def test_registered_and_documented() -> None:
    assert STRATEGIES.get("perfedavg") is PerFedAvg
    doc = (Path(__file__).resolve().parents[2] / "docs" / "strategies.md").read_text()
    assert "| `perfedavg` |" in doc


def test_tiny_in_process_run_reports_pre_and_post_adaptation(tiny_config: Callable[..., Config]) -> None:
    from fedmem.federation.sessions import run_on_engine

    cfg = tiny_config("strategy.name=perfedavg", "strategy.perfedavg.variant=hf", "eval.personalizers=[]")
    summary = run_on_engine(cfg.with_runtime(engine="inprocess")).summary()
    assert set(summary["accuracy"]) == {"global", "perfedavg"}
    assert set(summary["unseen_accuracy"]) == {"global", "perfedavg"}
    for acc in (summary["accuracy"], summary["unseen_accuracy"]):
        assert all(0.1 < stats["mean"] <= 1.0 for stats in acc.values())
