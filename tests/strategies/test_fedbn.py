from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedmem.errors import ConfigError
from fedmem.models import batchnorm_keys
from fedmem.strategy import ClientContext, Reply, get_weights
from strategies.fedbn import BN, FedBN
from tests.strategies.conftest import same as _same
from tests.strategies.conftest import saved as _saved
from tests.strategies.conftest import server

BN_MODEL = ("model.name=cnn_bn", "model.embedding_dim=8")


def test_a_model_without_batchnorm_is_a_config_error(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("model.name=cnn", "model.embedding_dim=8")
    with pytest.raises(ConfigError, match=r'model\.name = "cnn_bn"'):
        FedBN(ctx.cfg).check(server(ctx))
    with pytest.raises(ConfigError, match="BatchNorm"):
        FedBN(ctx.cfg).fit(ctx.new_model(), ctx)
    bn = make_ctx(*BN_MODEL)
    FedBN(bn.cfg).check(server(bn))
    assert list(FedBN(bn.cfg).init(get_weights(bn.new_model()), server(bn))) == ["model"]


def test_upload_has_no_batchnorm_keys_and_aggregate_keeps_the_state_ones(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx(*BN_MODEL)
    strategy = FedBN(ctx.cfg)
    model = ctx.new_model()
    bn = batchnorm_keys(model)
    assert "conv.1.running_mean" in bn and "embed.2.running_var" in bn and "conv.1.weight" in bn
    state = strategy.init(get_weights(model), server(strategy.cfg))
    update = strategy.fit(model, ctx)
    trained = get_weights(model)
    assert list(update.arrays) == ["model"]
    assert set(update.arrays["model"]) == set(trained) - set(bn)
    assert not _same(trained, state["model"], bn)  # training did move this client's BN layers
    other = make_ctx(*BN_MODEL, pid=1, seed=7)
    second = strategy.fit(other.new_model(), other)
    replies = [Reply(0, 60, update.arrays, {}), Reply(1, 60, second.arrays, {})]
    new, _ = strategy.aggregate(state, replies, server(strategy.cfg, 1))
    assert _same(new["model"], state["model"], bn)  # statistics and affine parameters, exactly
    k = "conv.0.weight"
    np.testing.assert_allclose(
        new["model"][k], (update.arrays["model"][k] + second.arrays["model"][k]) / 2, rtol=0, atol=1e-6
    )


def test_a_clients_batchnorm_layers_persist_across_rounds(make_ctx: Callable[..., ClientContext]) -> None:
    ctx1 = make_ctx(*BN_MODEL, server_round=1)
    strategy = FedBN(ctx1.cfg)
    strategy.fit(ctx1.new_model(), ctx1)
    saved = _saved(ctx1, BN)
    assert set(saved) == set(batchnorm_keys(ctx1.new_model()))
    # round 2: the received model carries the state's (initial) BN layers; the client uses its own
    ctx2 = make_ctx(*BN_MODEL, server_round=2)
    received = ctx2.new_model()
    fresh = get_weights(received)
    deployed = get_weights(strategy.client_model(received, ctx2))
    assert _same(deployed, saved, list(saved))
    assert _same(deployed, fresh, [k for k in fresh if k not in saved])
    # and trains from them: round 2's fit equals training (received non-BN + saved BN) by hand
    model = ctx2.new_model()
    strategy.fit(model, ctx2)
    oracle = ctx2.new_model()
    oracle.load_state_dict({**oracle.state_dict(), **{k: torch.from_numpy(v) for k, v in saved.items()}})
    strategy.train(oracle, ctx2)
    assert _same(get_weights(model), get_weights(oracle), list(fresh))


def test_cold_start_trains_batchnorm_only_and_saves_nothing(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx(*BN_MODEL)
    model = ctx.new_model()
    before = get_weights(model)
    after = get_weights(FedBN(ctx.cfg).client_model(model, ctx))
    bn = batchnorm_keys(model)
    assert _same(after, before, [k for k in before if k not in bn])
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        assert not _same(after, before, [f"conv.1.{suffix}"])
    assert ctx.load(BN) is None
