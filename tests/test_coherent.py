"""Coherent-gradient options: robust server aggregates and robust local gradients, by hand and end to end.

Server: the coordinate-wise median and trimmed mean of Yin et al. (ICML 2018) behind
``update.aggregate``. Client: winsorized per-example gradients and the median of three
mini-batch gradients (Chatterjee, ICLR 2020; Zielinski, Krishnan and Chatterjee,
arXiv:2003.07422) behind ``strategy.gradient``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedmem.config import Config, load_config
from fedmem.errors import ConfigError
from fedmem.models import build_model
from fedmem.strategy import Reply
from fedmem.training import (
    Batch,
    SGDSettings,
    cross_entropy_step,
    mean_gradient,
    median3_gradient,
    per_example_obstacle,
    train,
    winsorize,
    winsorized_gradient,
)
from fedmem.updates import (
    aggregate_uploads,
    coordinate_median,
    merge_average,
    trimmed_mean,
    weighted_average,
)
from tests.conftest import old_default_step
from tests.strategies.conftest import server


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


COUNTER = np.array(7, np.int64)  # an integer buffer (BatchNorm's counter): taken from the first client
UPLOADS = [
    {"w": _f32(1, 5, 2), "n": COUNTER},
    {"w": _f32(3, 1, 2), "n": np.array(8, np.int64)},
    {"w": _f32(2, 9, 2), "n": np.array(9, np.int64)},
]
FOURTH = {"w": _f32(10, 0, 4), "n": np.array(1, np.int64)}


# --------------------------------------------------------------------------- server: median, trimmed mean


def test_coordinate_median_by_hand_odd_even_and_ties() -> None:
    odd = coordinate_median(UPLOADS)
    np.testing.assert_array_equal(odd["w"], _f32(2, 5, 2))  # the middle of (1 2 3), (1 5 9), (2 2 2)
    assert odd["w"].dtype == np.float32 and odd["n"] == 7
    even = coordinate_median([*UPLOADS, FOURTH])
    # (1 2 | 3 10) -> 2.5; (0 1 | 5 9) -> 3; (2 2 | 2 4) -> 2, a tie in the middle
    np.testing.assert_array_equal(even["w"], _f32(2.5, 3, 2))
    assert even["n"] == 7


def test_trimmed_mean_by_hand() -> None:
    five = [*UPLOADS, FOURTH, {"w": _f32(100, -100, 2), "n": COUNTER}]
    # 0.2 of 5 clients: one cut at each end. (1 2 3 10 100) -> 5; (-100 0 1 5 9) -> 2; (2 2 2 2 4) -> 2
    np.testing.assert_array_equal(trimmed_mean(five, 0.2)["w"], _f32(5, 2, 2))
    # 0.25 of 4 clients cuts one at each end: the mean of the two middle values, i.e. the median
    four = [*UPLOADS, FOURTH]
    np.testing.assert_array_equal(trimmed_mean(four, 0.25)["w"], coordinate_median(four)["w"])
    # 0.2 of 4 clients is 0.8: floor -> nothing cut, the plain mean (16/4, 15/4, 10/4)
    np.testing.assert_array_equal(trimmed_mean(four, 0.2)["w"], _f32(4, 3.75, 2.5))
    assert trimmed_mean(four, 0.25)["n"] == 7
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\)"):
        trimmed_mean(four, 0.5)


def test_trim_fraction_zero_is_the_unweighted_mean() -> None:
    r = np.random.default_rng(0)
    uploads: list[dict[str, np.ndarray]] = [
        {"a": r.normal(size=(3, 4)).astype(np.float32), "n": COUNTER} for _ in range(5)
    ]
    got = trimmed_mean(uploads, 0.0)
    plain = weighted_average(uploads, [1.0] * 5)
    np.testing.assert_allclose(got["a"], plain["a"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(trimmed_mean(UPLOADS, 0.0)["w"], _f32(2, 5, 2))  # 6/3, 15/3, 6/3 exactly


def test_robust_aggregates_ignore_the_example_counts_and_mean_is_unchanged() -> None:
    for rule in ("median", "trimmed_mean"):
        a = aggregate_uploads(UPLOADS, [1, 100, 1], rule, 0.34)
        b = aggregate_uploads(UPLOADS, [1, 1, 1], rule, 0.34)
        np.testing.assert_array_equal(a["w"], b["w"])
    np.testing.assert_array_equal(
        aggregate_uploads(UPLOADS, [1, 2, 1], "mean")["w"], weighted_average(UPLOADS, [1, 2, 1])["w"]
    )
    with pytest.raises(ValueError, match="valid choices: mean, median, trimmed_mean"):
        aggregate_uploads(UPLOADS, [1, 1, 1], "max")


def test_merge_with_the_median_takes_each_name_over_its_own_uploaders() -> None:
    state = {"model": {"w": _f32(0, 0, 0), "n": COUNTER}, "cluster/1": {"w": _f32(-1)}}
    uploads = [({"model": u}, 1.0) for u in UPLOADS] + [({"cluster/1": {"w": _f32(4)}}, 5.0)]
    out = merge_average(state, uploads, lambda ws, cs: aggregate_uploads(ws, cs, "median"))
    np.testing.assert_array_equal(out["model"]["w"], _f32(2, 5, 2))
    np.testing.assert_array_equal(out["cluster/1"]["w"], _f32(4))


def _replies() -> list[Reply]:
    return [Reply(pid, 10 * (pid + 1), {"model": u}, {}) for pid, u in enumerate(UPLOADS)]


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("fedavg", []),
        ("fedavgm", ["strategy.fedavgm.server_momentum=0.0"]),  # x + 1 * (average - x) = the average
        ("pfedme", []),  # beta = 1: the average
    ],
)
def test_strategies_aggregate_with_the_configured_rule(strategy: str, extra: list[str]) -> None:
    from strategies import STRATEGIES

    state = {"model": {"w": _f32(0, 0, 0), "n": COUNTER}}
    for rule, expected in (("median", _f32(2, 5, 2)), ("mean", weighted_average(UPLOADS, [10, 20, 30])["w"])):
        cfg = load_config("default", [f"strategy.name={strategy}", f"update.aggregate={rule}", *extra])
        s = STRATEGIES.get(strategy)(cfg)
        if strategy == "fedavgm":
            state = {
                **state,
                **{k: v for k, v in s.init(state["model"], server(cfg)).items() if k != "model"},
            }
        new, _ = s.aggregate(state, _replies(), server(cfg, 1))
        np.testing.assert_allclose(new["model"]["w"], expected, rtol=1e-6)


# --------------------------------------------------------------------------- client: gradients by hand


def test_winsorize_by_hand() -> None:
    rows = torch.tensor([[1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 1.0], [100.0, 2.0]])
    assert torch.equal(winsorize(rows, 0), rows)
    # c = 1: column 0 clipped to [2, 4], column 1 to [0, 1]
    clipped = winsorize(rows, 1)
    assert clipped.tolist() == [[2, 0], [2, 0], [3, 1], [4, 1], [4, 1]]
    assert clipped.mean(dim=0).tolist() == pytest.approx([3.0, 0.6])
    # c too large for the batch: capped at (B - 1) // 2 = 2, which leaves only the median
    assert winsorize(rows, 7).tolist() == [[3, 1]] * 5
    even = torch.tensor([[1.0], [2.0], [5.0], [9.0]])
    assert winsorize(even, 5).tolist() == [[2], [2], [5], [5]]  # mean 3.5: the median of an even batch


def _cnn() -> nn.Module:
    return build_model("cnn", (1, 28, 28), 10, 16, 0)


def _batch(seed: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _never() -> Batch:
    raise AssertionError("this gradient draws no batch")


def test_winsorized_with_c_zero_is_the_batch_gradient() -> None:
    model, batch = _cnn(), _batch(0)
    loss = winsorized_gradient(0)(model, batch, _never)
    robust = _grads(model)
    model.zero_grad(set_to_none=True)
    expected_loss = mean_gradient()(model, batch, _never)
    plain = _grads(model)
    assert robust.keys() == plain.keys() == dict(model.named_parameters()).keys()
    for k in plain:
        torch.testing.assert_close(robust[k], plain[k], rtol=0, atol=1e-6)
    assert float(loss) == pytest.approx(float(expected_loss), abs=1e-6)


def test_winsorized_gradient_matches_a_loop_over_examples() -> None:
    """Oracle: per-example gradients by one backward per example, winsorized by hand, averaged."""
    model, (x, y) = _cnn(), _batch(1, 6)
    params = list(model.named_parameters())
    rows: dict[str, list[torch.Tensor]] = {k: [] for k, _ in params}
    for i in range(len(y)):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [p for _, p in params]
        )
        for (k, _), g in zip(params, grads, strict=True):
            rows[k].append(g)
    winsorized_gradient(2)(model, (x, y), _never)
    for k, p in params:
        stack = torch.stack(rows[k])  # (6, *shape)
        ordered = torch.sort(stack, dim=0).values
        expected = torch.minimum(torch.maximum(stack, ordered[2]), ordered[3]).mean(dim=0)
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-6)


def test_winsorized_gradient_leaves_frozen_parameters_alone() -> None:
    """FedPer / FedRep freeze a part (requires_grad False): only the rest gets gradients."""
    model, batch = _cnn(), _batch(2)
    for p in model.get_submodule("classifier").parameters():
        p.requires_grad_(False)
    winsorized_gradient(1)(model, batch, _never)
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {k for k in dict(model.named_parameters()) if not k.startswith("classifier.")}


def test_median3_of_three_identical_batches_is_that_batch_gradient() -> None:
    model, batch = _cnn(), _batch(3)
    loss = median3_gradient()(model, batch, lambda: batch)
    robust = _grads(model)
    model.zero_grad(set_to_none=True)
    assert float(loss) == float(mean_gradient()(model, batch, _never))
    for k, g in _grads(model).items():
        torch.testing.assert_close(robust[k], g, rtol=0, atol=1e-7)


def test_median3_takes_each_coordinate_from_one_of_the_three_batches() -> None:
    model = _cnn()
    batches = [_batch(4), _batch(5), _batch(6)]
    drawn = iter(batches[1:])
    loss = median3_gradient()(model, batches[0], lambda: next(drawn))
    robust = _grads(model)
    per_batch = []
    for b in batches:
        model.zero_grad(set_to_none=True)
        per_batch.append(_grads_after(model, b))
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(F.cross_entropy(model(batches[0][0]), batches[0][1])))
    for k, g in robust.items():
        stack = torch.stack([pb[k] for pb in per_batch])  # (3, *shape)
        assert torch.equal(g, torch.sort(stack, dim=0).values[1])  # the middle value, exactly
        assert bool(((stack == g).any(dim=0)).all())


def _grads_after(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    mean_gradient()(model, batch, _never)
    return _grads(model)


def test_extra_loss_composes_with_the_rule() -> None:
    """FedProx-like term: its gradient is added to the rule's; with c = 0 the step is the mean step."""
    anchor = [p.detach().clone() + 0.1 for p in _cnn().parameters()]

    def proximal(m: nn.Module) -> torch.Tensor:
        return (
            0.5
            * torch.stack(
                [torch.sum((p - a) ** 2) for p, a in zip(m.parameters(), anchor, strict=True)]
            ).sum()
        )

    batch = _batch(7)
    results = []
    for gradient in (None, winsorized_gradient(0)):
        model = _cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = cross_entropy_step(proximal, gradient)(model, batch, _never, optimizer)
        results.append((float(loss), [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_per_example_gradients_are_refused_where_they_do_not_exist() -> None:
    assert per_example_obstacle(_cnn()) is None
    assert "BatchNorm" in str(per_example_obstacle(build_model("cnn_bn", (1, 28, 28), 10, 16, 0)))
    assert "GRU" in str(per_example_obstacle(build_model("char_gru", (20,), 30, 16, 0)))
    with pytest.raises(ValueError, match="BatchNorm"):
        winsorized_gradient(1)(build_model("cnn_bn", (1, 28, 28), 10, 16, 0), _batch(0), _never)


# --------------------------------------------------------------------------- config and end to end


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["update.aggregate='max'"], ["update.aggregate", "mean, median, trimmed_mean"]),
        (["update.trim_fraction=0.5"], ["update.trim_fraction", "[0, 0.5)"]),
        (["strategy.gradient='clipped'"], ["strategy.gradient", "mean, winsorized, median3"]),
        (["strategy.gradient='winsorized'", "strategy.winsor_c=16"], ["strategy.winsor_c", "half"]),
        (["strategy.winsor_c=-1"], ["strategy.winsor_c", ">= 0"]),
    ],
)
def test_bad_values_are_refused_with_a_sentence(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("default", overrides)
    for word in words:
        assert word in str(err.value)


def test_winsor_c_is_checked_only_for_the_winsorized_gradient() -> None:
    load_config("default", ["strategy.batch_size=1"])  # the default winsor_c = 1 is not in the way
    load_config("default", ["strategy.gradient='winsorized'", "strategy.winsor_c=15"])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["strategy.name=local", "update.aggregate='median'"], ["update.aggregate", "local", "'mean'"]),
        (["strategy.name=apfl", "strategy.gradient='median3'"], ["strategy.gradient", "apfl", "'mean'"]),
        (["strategy.name=perfedavg", "strategy.gradient='winsorized'"], ["perfedavg"]),
        (["strategy.name=mrperfedavg", "strategy.gradient='median3'"], ["mrperfedavg"]),
        (["model.name=cnn_bn", "strategy.gradient='winsorized'"], ["winsorized", "BatchNorm", "median3"]),
    ],
)
def test_options_a_strategy_or_model_cannot_honour_are_refused(
    tiny_config: Callable[..., Config], overrides: list[str], words: list[str]
) -> None:
    from fedmem.jobs import preflight  # strategy checks, then those that need the model

    with pytest.raises(ConfigError) as err:
        preflight(tiny_config(*overrides))
    for word in words:
        assert word in str(err.value)
    preflight(tiny_config("model.name=cnn_bn", "strategy.gradient='median3'"))  # needs no per-example


def _honours(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count calls of the median3 rule and of the robust server aggregate."""
    import fedmem.strategy
    import fedmem.training

    calls = {"gradient": 0, "aggregate": 0}
    rule, aggregate = fedmem.training.median3_gradient, fedmem.strategy.aggregate_uploads

    def counted_rule(*factory_args: object) -> Callable[..., torch.Tensor]:
        inner = rule(*factory_args)  # type: ignore[arg-type]

        def gradient(*args: object) -> torch.Tensor:
            calls["gradient"] += 1
            return inner(*args)  # type: ignore[arg-type]

        return gradient

    def counted_aggregate(*args: object, **kwargs: object) -> object:
        calls["aggregate"] += 1
        return aggregate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fedmem.training, "median3_gradient", counted_rule)
    monkeypatch.setattr(fedmem.strategy, "aggregate_uploads", counted_aggregate)
    return calls


def _strategy_names() -> Sequence[str]:
    from strategies import STRATEGIES

    return STRATEGIES.names()


@pytest.mark.parametrize("name", _strategy_names())
def test_every_strategy_honours_or_refuses_the_options(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Each strategy's real fit takes the median3 rule and its aggregate goes through update.aggregate."""
    from fedmem.client import get_strategy, initial_weights, train_client
    from fedmem.simulation import server_context
    from strategies import STRATEGIES, check_config

    cls = STRATEGIES.get(name)
    model = ["model.name=cnn_bn"] if name == "fedbn" else []
    base = [f"strategy.name={name}", "strategy.local_steps=1", "update.aggregate='median'", *model]
    gradient = "median3" if cls.robust_gradients else "mean"
    if not cls.robust_gradients:
        with pytest.raises(ConfigError, match=r"strategy\.gradient"):
            check_config(tiny_config(*base, "strategy.gradient='median3'"))
    if not cls.averages_uploads:
        with pytest.raises(ConfigError, match=r"update\.aggregate"):
            check_config(tiny_config(*base))
        base = [*base, "update.aggregate='mean'"]
    cfg = tiny_config(*base, f"strategy.gradient='{gradient}'")
    check_config(cfg)
    cfg = cfg.with_runtime(run_dir=str(cfg.runtime.output_dir))
    strategy = get_strategy(cfg)
    state = strategy.init(initial_weights(cfg), server_context(cfg))
    calls = _honours(monkeypatch)
    updates = [train_client(cfg, pid, 1, strategy.broadcast(state, 1)) for pid in (0, 1)]
    if cls.robust_gradients:
        assert calls["gradient"] >= 2  # one local step per client at least
    replies = [
        Reply(pid, u.num_examples, u.arrays, u.metrics) for pid, u in zip((0, 1), updates, strict=True)
    ]
    strategy.aggregate(state, replies, server_context(cfg, 1))
    assert calls["aggregate"] >= 1 if cls.averages_uploads else calls["aggregate"] == 0


@pytest.mark.usefixtures("one_thread")
def test_mean_options_give_the_old_numbers(tiny_config: Callable[..., Config]) -> None:
    """One FedAvg round, options spelt out: local SGD with the old step, then weighted_average."""
    from fedmem.client import client_data, initial_weights, new_model
    from fedmem.privacy import sample_clients
    from fedmem.seeding import rng
    from fedmem.simulation import InProcessExecutor, run_federation
    from fedmem.strategy import get_weights, set_weights

    cfg = tiny_config(
        "rounds=1", "eval.personalizers=[]", "strategy.gradient='mean'", "update.aggregate='mean'"
    )
    state, _ = run_federation(cfg, InProcessExecutor(cfg))
    start, s = initial_weights(cfg), cfg.strategy
    settings = SGDSettings(s.lr, s.momentum, s.weight_decay, s.local_epochs, s.local_steps, s.batch_size)
    from fedmem.federated_data import training_clients

    uploads, counts = [], []
    for pid in sample_clients(cfg.seed, 1, training_clients(cfg), s.fraction_fit):
        data, _ = client_data(cfg, pid)
        model = new_model(cfg)
        set_weights(model, start)
        fit_rng = rng(cfg.seed, "fit", 1, pid)
        train(model, data.x_train, data.y_train, settings, fit_rng, step=old_default_step)
        uploads.append(get_weights(model))
        counts.append(len(data.y_train))
    expected = weighted_average(uploads, counts)
    for k, v in expected.items():
        np.testing.assert_array_equal(state["model"][k], v)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as a Ray actor has: two threads on a busy 2-core machine made vmap 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "options",
    [
        ["update.aggregate='median'"],
        ["update.aggregate='trimmed_mean'", "update.trim_fraction=0.34"],
        ["strategy.gradient='winsorized'", "strategy.winsor_c=2"],
        ["strategy.gradient='median3'"],
    ],
)
def test_a_tiny_run_with_each_option_completes_and_differs_from_the_mean(
    tiny_config: Callable[..., Config], options: list[str]
) -> None:
    from fedmem.simulation import InProcessExecutor, run_federation

    short = ["eval.personalizers=[]", "strategy.local_steps=3"]
    cfg = tiny_config(*short)
    plain, _ = run_federation(cfg, InProcessExecutor(cfg))
    robust_cfg = tiny_config(*short, *options)
    robust, summary = run_federation(robust_cfg, InProcessExecutor(robust_cfg))
    assert 0 <= summary["accuracy"]["global"]["mean"] <= 1
    assert all(np.all(np.isfinite(v)) for v in robust["model"].values())
    assert any(not np.array_equal(robust["model"][k], plain["model"][k]) for k in plain["model"])
