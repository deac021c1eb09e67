from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from fedmem.errors import ConfigError
from fedmem.models import batchnorm_keys, head_keys
from fedmem.strategy import ClientContext, Reply, get_weights, set_weights
from strategies.fedper import HEAD
from strategies.fedrep import FedRep
from tests.strategies.conftest import same as _same
from tests.strategies.conftest import saved as _saved
from tests.strategies.conftest import server

SMALL = "model.embedding_dim=8"


@pytest.mark.parametrize("model_name", ["cnn", "cnn_bn"])
def test_each_phase_leaves_the_other_part_exactly_unchanged(
    make_ctx: Callable[..., ClientContext], model_name: str
) -> None:
    ctx = make_ctx(SMALL, f"model.name={model_name}")
    strategy = FedRep(ctx.cfg)
    model = ctx.new_model()
    heads = head_keys(model)
    body = [k for k in get_weights(model) if k not in heads]
    if model_name == "cnn_bn":
        assert batchnorm_keys(model)  # the body's running statistics must not move in the head phase
    w0 = get_weights(model)
    strategy.train_head(model, ctx, strategy.cold_start_settings(ctx))
    w1 = get_weights(model)
    assert _same(w1, w0, body) and not _same(w1, w0, heads)
    strategy.train_body(model, ctx)
    w2 = get_weights(model)
    assert _same(w2, w1, heads) and not _same(w2, w1, [k for k in body if "weight" in k])


def test_fit_uploads_the_body_and_saves_the_head_of_the_head_phase(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(SMALL, "strategy.fedrep.head_epochs=2")
    strategy = FedRep(ctx.cfg)
    model = ctx.new_model()
    heads = head_keys(model)
    update = strategy.fit(model, ctx)
    assert list(update.arrays) == ["model"] and not set(update.arrays["model"]) & set(heads)
    assert update.metrics["steps"] == 2 * 2 + 2  # 60 examples, batch 32: 2 head epochs, 1 body epoch
    # oracle: the head phase alone from the received model gives exactly the saved head
    oracle = ctx.new_model()
    strategy.train_head(oracle, ctx, replace(ctx.sgd(), epochs=2))
    saved = _saved(ctx, HEAD)
    assert all(np.array_equal(saved[k], get_weights(oracle)[k]) for k in heads)


def test_saved_head_is_the_start_of_the_next_round(make_ctx: Callable[..., ClientContext]) -> None:
    ctx1 = make_ctx(SMALL, server_round=1)
    strategy = FedRep(ctx1.cfg)
    strategy.fit(ctx1.new_model(), ctx1)
    head1 = _saved(ctx1, HEAD)
    # round 2 receives the initial model; oracle: its body with round 1's head, then both phases
    ctx2 = make_ctx(SMALL, server_round=2)
    received = ctx2.new_model()
    strategy.fit(received, ctx2)
    oracle = ctx2.new_model()
    set_weights(oracle, head1, strict=False)
    strategy.train_personal(oracle, ctx2)
    want, got = get_weights(oracle), get_weights(received)
    assert _same(got, want, list(want))
    saved = _saved(ctx2, HEAD)
    assert all(np.array_equal(saved[k], want[k]) for k in head1)
    assert not all(np.array_equal(saved[k], head1[k]) for k in head1)


def test_aggregate_keeps_the_state_head(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(SMALL)
    strategy = FedRep(ctx.cfg)
    state = strategy.init(get_weights(ctx.new_model()), server(strategy.cfg))
    update = strategy.fit(ctx.new_model(), ctx)
    new, _ = strategy.aggregate(
        state, [Reply(0, update.num_examples, update.arrays, update.metrics)], server(strategy.cfg, 1)
    )
    heads = head_keys(ctx.new_model())
    assert _same(new["model"], state["model"], heads)
    assert _same(new["model"], update.arrays["model"], list(update.arrays["model"]))


def test_cold_start_is_the_head_phase_and_saves_nothing(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(SMALL)
    strategy = FedRep(ctx.cfg)
    deployed = get_weights(strategy.client_model(ctx.new_model(), ctx))
    oracle = ctx.new_model()
    strategy.train_head(oracle, ctx, replace(ctx.sgd(), epochs=1))
    assert _same(deployed, get_weights(oracle), list(deployed))
    assert ctx.load(HEAD) is None


def test_head_epochs_must_be_positive(make_ctx: Callable[..., ClientContext]) -> None:
    with pytest.raises(ConfigError, match="head_epochs"):
        FedRep(make_ctx("strategy.fedrep.head_epochs=0").cfg)
