from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedmem.strategy import ClientContext, get_weights
from strategies.fedavg import FedAvg
from strategies.finetune import FineTune
from strategies.local import Local
from tests.strategies.conftest import server, synthetic_test


def test_finetune_leaves_the_model_alone_and_adapts_a_copy(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("finetune.epochs=5", "finetune.lr=0.05")
    # a client whose train labels are all class 2: fine-tuning must learn that
    d = ctx.data
    twos = torch.full_like(d.y_train, 2)
    data = type(d)(d.pid, d.seen, d.num_classes, d.x_train, twos, d.x_val, d.y_val)
    ctx = ClientContext(ctx.cfg, ctx.pid, ctx.round, data)
    model = ctx.new_model()
    before = get_weights(model)
    predictor = FineTune(ctx.cfg).personalize(model, ctx)
    after = get_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert (predictor.predict(synthetic_test()[0]).argmax(1) == 2).all()


def test_fedavg_fit_changes_weights_deterministically(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx()
    m1, m2 = ctx.new_model(), ctx.new_model()
    r1, r2 = FedAvg(ctx.cfg).fit(m1, ctx), FedAvg(ctx.cfg).fit(m2, ctx)
    assert r1.metrics == r2.metrics and r1.metrics["steps"] == 2  # 60 examples, batch 32
    assert list(r1.arrays) == ["model"] and r1.num_examples == 60
    w0, w1, w2 = get_weights(ctx.new_model()), get_weights(m1), get_weights(m2)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert not all(np.array_equal(w0[k], w1[k]) for k in w0)


def test_local_keeps_training_its_own_model_on_disk(make_ctx: Callable[..., ClientContext]) -> None:
    ctx1 = make_ctx(server_round=1)
    strategy = Local(ctx1.cfg)
    fresh = ctx1.new_model()
    init = get_weights(fresh)
    strategy.fit(fresh, ctx1)
    after1 = get_weights(fresh)
    assert ctx1.load("local_model") is not None
    # round 2 receives the (unchanged) initial weights, but continues from the client's own model
    ctx2 = make_ctx(server_round=2)
    received = ctx2.new_model()
    strategy.fit(received, ctx2)
    reference = ctx1.new_model()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in after1.items()})
    FedAvg(ctx2.cfg).fit(reference, ctx2)
    got, want = get_weights(received), get_weights(reference)
    assert all(np.array_equal(got[k], want[k]) for k in got)
    deployed = get_weights(strategy.client_model(ctx2.new_model(), ctx2))
    assert all(np.array_equal(deployed[k], want[k]) for k in deployed)
    # nothing travels: the reply uploads no arrays, and the server state stays the initial model
    update = strategy.fit(ctx2.new_model(), ctx2)
    assert update.arrays == {}
    state, _ = strategy.aggregate({"model": init}, [], server(strategy.cfg, 3))
    assert all(np.array_equal(state["model"][k], init[k]) for k in init)
