from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmem.strategy import PERSONAL, ClientContext, get_weights
from fedmem.training import train
from strategies.ditto import Ditto
from strategies.fedavg import FedAvg
from tests.strategies.conftest import same as _equal
from tests.strategies.conftest import saved

TINY = "model.embedding_dim=8"


def test_infinite_lambda_keeps_the_personal_model_on_the_received_one(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(TINY, "strategy.ditto.lam=1e12")
    received = get_weights(ctx.new_model())
    Ditto(ctx.cfg).fit(ctx.new_model(), ctx)
    personal = saved(ctx, PERSONAL)
    assert all(np.allclose(personal[k], received[k], rtol=0, atol=1e-7) for k in received)
    # and a finite lambda does move it: the assertion above is not vacuous
    finite = make_ctx(TINY, "strategy.ditto.lam=0.1", pid=1)
    Ditto(finite.cfg).fit(finite.new_model(), finite)
    assert not _equal(saved(finite, PERSONAL), received)


def test_zero_lambda_is_plain_local_training_from_the_global_model(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(TINY, "strategy.ditto.lam=0.0")
    Ditto(ctx.cfg).fit(ctx.new_model(), ctx)
    reference = ctx.new_model()
    train(reference, ctx.data.x_train, ctx.data.y_train, ctx.sgd(), ctx.rng(PERSONAL))
    assert _equal(saved(ctx, PERSONAL), get_weights(reference))
    # round 2 continues from the saved personal model, not from the received one
    ctx2 = make_ctx(TINY, "strategy.ditto.lam=0.0", server_round=2)
    Ditto(ctx2.cfg).fit(ctx2.new_model(), ctx2)
    train(reference, ctx2.data.x_train, ctx2.data.y_train, ctx2.sgd(), ctx2.rng(PERSONAL))
    assert _equal(saved(ctx2, PERSONAL), get_weights(reference))


def test_upload_is_exactly_fedavgs(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(TINY, "strategy.ditto.lam=1.0", server_round=3)
    update = Ditto(ctx.cfg).fit(ctx.new_model(), ctx)
    reference = FedAvg(ctx.cfg).fit(ctx.new_model(), ctx)
    assert list(update.arrays) == ["model"] and update.num_examples == reference.num_examples
    assert _equal(update.arrays["model"], reference.arrays["model"])


def test_personal_model_is_the_predictor_and_cold_start_saves_nothing(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(TINY, "strategy.ditto.lam=0.5")
    strategy = Ditto(ctx.cfg)
    assert strategy.reports_global and strategy.label == "ditto"
    # cold start: the personal training of fit, from the received model, and no file written
    cold = get_weights(strategy.client_model(ctx.new_model(), ctx))
    assert ctx.load(PERSONAL) is None
    strategy.fit(ctx.new_model(), ctx)
    assert _equal(cold, saved(ctx, PERSONAL))
    # a trained client deploys its saved model whatever global model it receives
    other = ctx.model_from({k: v + 1 for k, v in get_weights(ctx.new_model()).items()})
    assert _equal(get_weights(strategy.client_model(other, ctx)), saved(ctx, PERSONAL))
