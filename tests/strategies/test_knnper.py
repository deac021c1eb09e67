from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedmem.strategy import ClientContext
from fedmem.training import logits_and_embeddings, softmax
from strategies.knnper import KnnPer, KnnPredictor
from tests.strategies.conftest import synthetic_test


def test_lambda_zero_gives_exactly_the_backbone_predictions(make_ctx: Callable[..., ClientContext]) -> None:
    ctx = make_ctx("memory.lambda_grid=[0.0]")
    model = ctx.new_model()
    predictor = KnnPer(ctx.cfg).personalize(model, ctx)
    assert predictor.info["lambda"] == 0.0
    x_test, _ = synthetic_test()
    logits, _ = logits_and_embeddings(model, x_test)
    np.testing.assert_array_equal(predictor.predict(x_test), softmax(logits))


def test_lambda_one_k_one_on_training_points_returns_their_labels(
    make_ctx: Callable[..., ClientContext],
) -> None:
    ctx = make_ctx("memory.lambda_grid=[1.0]", "memory.k_grid=[1]")
    predictor = KnnPer(ctx.cfg).personalize(ctx.new_model(), ctx)
    assert isinstance(predictor, KnnPredictor) and (predictor.lam, predictor.k) == (1.0, 1)
    predicted = predictor.predict(ctx.data.x_train).argmax(axis=1)
    np.testing.assert_array_equal(predicted, ctx.data.y_train.numpy())


def test_selection_uses_validation_and_reports_it(make_ctx: Callable[..., ClientContext]) -> None:
    # Validation inputs are the training inputs with their labels: the memory is then perfect on
    # validation (k = 1, lambda = 1) while an untrained model is near chance, so both must be picked.
    ctx = make_ctx("memory.k_grid=[1, 5]", "memory.lambda_grid=[0.0, 1.0]")
    d = ctx.data
    same = type(d)(d.pid, d.seen, d.num_classes, d.x_train, d.y_train, d.x_train, d.y_train)
    ctx = ClientContext(ctx.cfg, ctx.pid, ctx.round, same)
    predictor = KnnPer(ctx.cfg).personalize(ctx.new_model(), ctx)
    assert predictor.info == {"lambda": 1.0, "k": 1.0, "val_accuracy": 1.0}


def test_mix_logits_compatibility_option_changes_predictions(make_ctx: Callable[..., ClientContext]) -> None:
    probs = KnnPer(make_ctx("memory.lambda_grid=[0.5]").cfg)
    ctx = make_ctx("memory.lambda_grid=[0.5]")
    ctx_logits = make_ctx("memory.lambda_grid=[0.5]", "memory.mix_logits=true")
    x_test, _ = synthetic_test()
    p = probs.personalize(ctx.new_model(), ctx).predict(x_test)
    q = KnnPer(ctx_logits.cfg).personalize(ctx_logits.new_model(), ctx_logits).predict(x_test)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert not np.allclose(q.sum(axis=1), 1.0)  # raw logits are not a distribution: that is the point


def test_oracle_is_the_best_grid_accuracy_on_the_data_it_is_given(
    make_ctx: Callable[..., ClientContext],
) -> None:
    from fedmem.training import accuracy

    one = make_ctx("memory.k_grid=[3]", "memory.lambda_grid=[0.5]")
    predictor = KnnPer(one.cfg).personalize(one.new_model(), one)
    assert isinstance(predictor, KnnPredictor)
    x, y = synthetic_test()
    # with a single (k, lambda) the oracle is exactly the predictor's own test accuracy
    assert predictor.oracle_accuracy(x, y) == accuracy(predictor.predict(x), y.numpy())
    full = make_ctx("memory.k_grid=[1, 3, 5]", "memory.lambda_grid=[0.0, 0.5, 1.0]")
    tuned = KnnPer(full.cfg).personalize(full.new_model(), full)
    assert isinstance(tuned, KnnPredictor)
    honest = accuracy(tuned.predict(x), y.numpy())
    oracle = tuned.oracle_accuracy(x, y)
    assert oracle >= honest
    # and no single pair does better on test than the oracle
    for k in (1, 3, 5):
        for lam in (0.0, 0.5, 1.0):
            fixed = KnnPredictor(
                tuned.model, tuned.store, lam, k, tuned.num_classes, tuned.memory, tuned.temperature, 256, {}
            )
            assert accuracy(fixed.predict(x), y.numpy()) <= oracle
