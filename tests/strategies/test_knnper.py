from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from fedmem.config import Config
from fedmem.strategy import ClientContext
from fedmem.training import logits_and_embeddings, softmax, to_rows
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


# Private memory (memory.exclude_self, memory.embedding_noise); the datastore's own tests are in
# tests/memory/test_private_memory.py.


def _nearest_other_labels(z: NDArray[np.floating], labels: NDArray[np.int64]) -> NDArray[np.int64]:
    d2 = ((z[:, None, :].astype(np.float64) - z[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(d2, np.inf)
    out: NDArray[np.int64] = labels[d2.argmin(axis=1)]
    return out


def test_knnper_scores_a_member_by_its_nearest_other_entry(make_ctx: Callable[..., ClientContext]) -> None:
    # lambda = 1, k = 1: the prediction on a training input is the label of its nearest stored
    # entry; with exclude_self that is the nearest *other* entry, as for a non-member
    ctx = make_ctx("memory.lambda_grid=[1.0]", "memory.k_grid=[1]", "memory.exclude_self=true")
    model = ctx.new_model()
    predictor = KnnPer(ctx.cfg).personalize(model, ctx)
    assert isinstance(predictor, KnnPredictor) and predictor.store.exclude_self
    _, z = logits_and_embeddings(model, ctx.data.x_train)
    y = ctx.data.y_train.numpy()
    want = _nearest_other_labels(to_rows(z), y)
    np.testing.assert_array_equal(predictor.predict(ctx.data.x_train).argmax(axis=1), want)
    assert (want != y).any()  # random labels: the member's own label no longer wins everywhere


def _first_distances(ctx: ClientContext) -> NDArray[np.float32]:
    model = ctx.new_model()
    predictor = KnnPer(ctx.cfg).personalize(model, ctx)
    assert isinstance(predictor, KnnPredictor)
    _, z = logits_and_embeddings(model, ctx.data.x_train)
    dist, _ = predictor.store.search(to_rows(z), 1)  # distance of each member to its noisy entry
    return dist


def test_knnper_noise_is_keyed_by_seed_and_client_not_round(make_ctx: Callable[..., ClientContext]) -> None:
    noisy = ("memory.embedding_noise=0.1",)
    a = _first_distances(make_ctx(*noisy, pid=0))
    # the synthetic client's data do not depend on pid: only the noise differs between clients
    np.testing.assert_array_equal(a, _first_distances(make_ctx(*noisy, pid=0)))
    np.testing.assert_array_equal(a, _first_distances(make_ctx(*noisy, pid=0, server_round=3)))
    assert not np.array_equal(a, _first_distances(make_ctx(*noisy, pid=1)))
    assert not np.array_equal(a, _first_distances(make_ctx(*noisy, "seed=1", pid=0)))
    assert (a > 0).all() and (_first_distances(make_ctx(pid=0)) < 1e-6).all()


def test_tiny_run_with_every_option_on(tiny_config: Callable[..., Config]) -> None:
    from fedmem.federation.sessions import run_on_engine

    options = ("memory.exclude_self=true", "memory.embedding_noise=0.05", "memory.capacity=100")
    cfg = tiny_config("strategy.name=knnper", "eval.personalizers=[]", *options)
    summary = run_on_engine(cfg.with_runtime(engine="inprocess")).summary()
    for acc in (summary["accuracy"]["knn"], summary["unseen_accuracy"]["knn"]):
        assert 0.1 < acc["mean"] <= 1.0
