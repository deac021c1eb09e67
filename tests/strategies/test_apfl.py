from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmem.strategy import PERSONAL, ClientContext, get_weights
from strategies.apfl import ALPHA, Apfl, mixed_gradients, mixture
from strategies.fedavg import FedAvg

TINY = "model.embedding_dim=8"


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _saved_alpha(ctx: ClientContext) -> float:
    alpha = ctx.load(ALPHA)
    assert alpha is not None
    return float(alpha)


def test_alpha_gradient_matches_the_hand_computed_linear_case() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2)  # holds w
    v = {k: torch.randn(p.shape, generator=g).requires_grad_() for k, p in model.named_parameters()}
    x, y = torch.randn(5, 3, generator=g), torch.tensor([0, 1, 1, 0, 1])
    alpha = torch.tensor(0.3, requires_grad=True)
    loss, grads, grad_alpha = mixed_gradients(model, v, {}, alpha, (x, y))
    # by hand: mixed weights, softmax cross-entropy gradient (p - onehot)^T x / n at v_bar
    w = {k: p.detach() for k, p in model.named_parameters()}
    W = 0.3 * v["weight"].detach() + 0.7 * w["weight"]
    b = 0.3 * v["bias"].detach() + 0.7 * w["bias"]
    p = torch.softmax(x @ W.T + b, dim=1)
    assert torch.allclose(loss, -torch.log(p[torch.arange(5), y]).mean())
    residual = (p - nn.functional.one_hot(y, 2).float()) / 5  # (5, 2)
    g_w, g_b = residual.T @ x, residual.sum(0)
    expected_alpha = (g_w * (v["weight"] - w["weight"])).sum() + (g_b * (v["bias"] - w["bias"])).sum()
    assert torch.allclose(grad_alpha, expected_alpha, atol=1e-6)
    assert torch.allclose(grads[0], 0.3 * g_w, atol=1e-6) and torch.allclose(grads[1], 0.3 * g_b, atol=1e-6)
    assert abs(float(grad_alpha)) > 1e-3  # the case is not degenerate


def test_alpha_zero_predicts_with_the_global_model_exactly(make_ctx: Callable[..., ClientContext]) -> None:
    opts = (TINY, "strategy.apfl.alpha=0.0", "strategy.apfl.alpha_lr=0.0")
    ctx = make_ctx(*opts)
    strategy = Apfl(ctx.cfg)
    received = get_weights(ctx.new_model())
    # cold start: the mixture is the locally trained w, i.e. exactly FedAvg's local update
    cold = strategy.client_model(ctx.new_model(), ctx)
    fedavg = FedAvg(ctx.cfg).fit(ctx.new_model(), ctx)
    assert _equal(get_weights(cold), fedavg.arrays["model"])
    assert ctx.load(PERSONAL) is None and ctx.load(ALPHA) is None
    # a trained client: v gets no gradient (it stays the received model), alpha stays 0,
    # and the predictor is the newly received global model exactly
    strategy.fit(ctx.new_model(), ctx)
    saved = ctx.load(PERSONAL)
    assert saved is not None and _equal({k: t.numpy() for k, t in saved.items()}, received)
    assert _saved_alpha(ctx) == 0.0
    new_global = {k: v + 0.5 for k, v in received.items()}
    assert _equal(get_weights(strategy.client_model(ctx.model_from(new_global), ctx)), new_global)


def test_upload_is_exactly_fedavgs_and_the_predictor_is_the_mixture(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(TINY, "strategy.apfl.alpha=0.5", "strategy.apfl.alpha_lr=1.0", server_round=2)
    strategy = Apfl(ctx.cfg)
    assert strategy.reports_global and strategy.label == "apfl"
    update = strategy.fit(ctx.new_model(), ctx)
    reference = FedAvg(ctx.cfg).fit(ctx.new_model(), ctx)
    assert list(update.arrays) == ["model"] and _equal(update.arrays["model"], reference.arrays["model"])
    alpha = _saved_alpha(ctx)
    assert 0.0 < alpha < 1.0 and alpha != 0.5 and update.metrics["alpha"] == alpha
    saved = ctx.load(PERSONAL)
    assert saved is not None
    w = update.arrays["model"]
    got = get_weights(strategy.client_model(ctx.model_from(w), ctx))
    for k in w:
        np.testing.assert_allclose(
            got[k], alpha * saved[k].numpy() + (1 - alpha) * w[k], rtol=1e-6, atol=1e-7
        )


def test_alpha_is_clamped_to_the_unit_interval(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(TINY, "strategy.apfl.alpha_lr=1e4", "strategy.local_epochs=2")
    Apfl(ctx.cfg).fit(ctx.new_model(), ctx)
    # steps of size 1e4 * |gradient| leave [0, 1] at once: only the clamp keeps alpha inside
    assert _saved_alpha(ctx) in (0.0, 1.0)


def test_batchnorm_buffers_follow_the_mixed_forward_and_are_mixed(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(TINY, "model.name='cnn_bn'")
    received = ctx.new_model()
    Apfl(ctx.cfg).fit(ctx.new_model(), ctx)
    saved = ctx.load(PERSONAL)
    assert saved is not None
    assert not torch.equal(saved["conv.1.running_mean"], received.state_dict()["conv.1.running_mean"])
    personal = ctx.model_from({k: t.numpy() for k, t in saved.items()})
    mixed = mixture(personal, received, 0.25).state_dict()
    w, v = received.state_dict(), personal.state_dict()
    assert torch.allclose(
        mixed["conv.1.running_var"], 0.25 * v["conv.1.running_var"] + 0.75 * w["conv.1.running_var"]
    )
    assert torch.equal(mixed["conv.1.num_batches_tracked"], w["conv.1.num_batches_tracked"])
    assert not torch.equal(v["conv.1.num_batches_tracked"], w["conv.1.num_batches_tracked"])
