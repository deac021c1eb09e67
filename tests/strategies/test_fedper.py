from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmem.models import head_keys
from fedmem.strategy import ClientContext, Reply, get_weights, set_weights
from strategies.fedavg import FedAvg
from strategies.fedper import HEAD, FedPer
from tests.strategies.conftest import same as _equal
from tests.strategies.conftest import saved as _saved
from tests.strategies.conftest import server

SMALL = "model.embedding_dim=8"


def test_upload_is_the_body_only_and_the_head_is_saved(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(SMALL)
    model = ctx.new_model()
    heads = head_keys(model)
    assert heads == ["classifier.weight", "classifier.bias"]
    update = FedPer(ctx.cfg).fit(model, ctx)
    trained = get_weights(model)
    assert list(update.arrays) == ["model"]
    assert set(update.arrays["model"]) == set(trained) - set(heads)
    assert _equal(update.arrays["model"], trained, list(update.arrays["model"]))
    saved = _saved(ctx, HEAD)
    assert set(saved) == set(heads)
    assert all(np.array_equal(saved[k], trained[k]) for k in heads)
    # first participation trains body and head jointly from the received model: exactly FedAvg's fit
    reference = ctx.new_model()
    FedAvg(ctx.cfg).fit(reference, ctx)
    assert _equal(trained, get_weights(reference), list(trained))


def test_saved_head_is_reused_next_round(make_ctx: Callable[..., ClientContext]) -> None:
    ctx1 = make_ctx(SMALL, server_round=1)
    strategy = FedPer(ctx1.cfg)
    strategy.fit(ctx1.new_model(), ctx1)
    head1 = _saved(ctx1, HEAD)
    # round 2 receives the initial model (its head is the state's, never updated)
    ctx2 = make_ctx(SMALL, server_round=2)
    received = ctx2.new_model()
    strategy.fit(received, ctx2)
    reference = ctx2.new_model()
    set_weights(reference, head1, strict=False)
    FedAvg(ctx2.cfg).fit(reference, ctx2)
    want, got = get_weights(reference), get_weights(received)
    assert _equal(got, want, list(want))
    # deploying loads the saved head on the received body, untrained and exactly
    deployed = get_weights(strategy.client_model(ctx2.new_model(), ctx2))
    fresh = get_weights(ctx2.new_model())
    heads = head_keys(reference)
    assert _equal(deployed, want, heads)
    assert _equal(deployed, fresh, [k for k in fresh if k not in heads])


def test_aggregate_averages_bodies_and_keeps_the_state_head(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(SMALL)
    strategy = FedPer(ctx.cfg)
    state = strategy.init(get_weights(ctx.new_model()), server(strategy.cfg))
    heads = head_keys(ctx.new_model())
    body = {k: v for k, v in state["model"].items() if k not in heads}
    one = {k: v + 1.0 for k, v in body.items()}
    two = {k: v + 5.0 for k, v in body.items()}
    replies = [Reply(0, 30, {"model": one}, {}), Reply(1, 10, {"model": two}, {})]
    new, _ = strategy.aggregate(state, replies, server(strategy.cfg, 1))
    assert _equal(new["model"], state["model"], heads)  # the head is untouched, exactly
    for k, v in body.items():  # (30 * (v + 1) + 10 * (v + 5)) / 40 = v + 2
        np.testing.assert_allclose(new["model"][k], v + 2.0, rtol=0, atol=1e-5)


def test_cold_start_trains_the_head_only_and_saves_nothing(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(SMALL)
    model = ctx.new_model()
    before = get_weights(model)
    after = get_weights(FedPer(ctx.cfg).client_model(model, ctx))
    heads = head_keys(model)
    assert _equal(after, before, [k for k in before if k not in heads])
    assert not _equal(after, before, heads)
    assert ctx.load(HEAD) is None
