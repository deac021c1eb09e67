from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmem.strategy import ClientContext, get_weights
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def test_proximal_term_and_its_gradient_by_hand(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("strategy.fedprox.mu=0.5")
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([3.0]))
    proximal = FedProx(ctx.cfg).extra_loss(model, ctx)  # anchored at (1, 2; 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))  # w - anchor = (1, -2)
        model.bias.copy_(torch.tensor([3.5]))  # b - anchor = 0.5
    value = proximal(model)
    value.backward()
    # 0.5 / 2 * (1 + 4 + 0.25) = 1.3125; gradient mu * (w - anchor)
    assert value.item() == 1.3125
    assert model.weight.grad is not None and model.bias.grad is not None
    assert model.weight.grad.tolist() == [[0.5, -1.0]]
    assert model.bias.grad.tolist() == [0.25]


def test_mu_zero_is_fedavg_and_mu_pulls_towards_the_received_model(
    make_ctx: Callable[..., ClientContext],
) -> None:
    base = ("model.embedding_dim=8", "strategy.local_epochs=3")
    ctx0 = make_ctx(*base, "strategy.fedprox.mu=0.0", n=30)
    received = get_weights(ctx0.new_model())
    avg, prox0 = ctx0.new_model(), ctx0.new_model()
    FedAvg(ctx0.cfg).fit(avg, ctx0)
    update0 = FedProx(ctx0.cfg).fit(prox0, ctx0)
    w_avg, w0 = get_weights(avg), update0.arrays["model"]
    assert all(np.array_equal(w_avg[k], w0[k]) for k in w_avg)
    ctx1 = make_ctx(*base, "strategy.fedprox.mu=20.0", n=30)
    w1 = FedProx(ctx1.cfg).fit(ctx1.new_model(), ctx1).arrays["model"]
    d0, d1 = _distance(w0, received), _distance(w1, received)
    assert 0 < d1 < 0.9 * d0, (d1, d0)
