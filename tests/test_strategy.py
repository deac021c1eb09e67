from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest
import torch

import strategies
from fedmem.errors import ConfigError
from fedmem.models import build_model
from fedmem.strategy import Strategy, Weights, get_weights, set_weights
from fedmem.updates import weighted_average
from strategies import STRATEGIES


def test_weighted_average_of_two_tiny_models_by_hand() -> None:
    a: Weights = {"w": np.array([1.0, 2.0], np.float32), "steps": np.array(7, np.int64)}
    b: Weights = {"w": np.array([3.0, 6.0], np.float32), "steps": np.array(9, np.int64)}
    out = weighted_average([a, b], [1, 3])
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], np.float32))  # (1*1 + 3*3)/4, (2 + 18)/4
    assert out["w"].dtype == np.float32
    assert out["steps"] == 7  # integer buffers come from the first reply


def test_weighted_average_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="positive total"):
        weighted_average([{"w": np.zeros(1)}], [0])


def test_every_module_in_strategies_is_registered() -> None:
    registered = {cls for _, cls in STRATEGIES.items()}
    for info in pkgutil.iter_modules(strategies.__path__):
        module = importlib.import_module(f"strategies.{info.name}")
        defined = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Strategy) and obj.__module__ == module.__name__
        ]
        assert defined, f"strategies/{info.name}.py defines no Strategy"
        for cls in defined:
            assert cls in registered, f"{cls.__name__} in strategies/{info.name}.py is not registered"
            assert cls.summary and cls.__doc__ and module.__doc__


def test_every_registered_strategy_is_documented_with_its_parameters() -> None:
    import dataclasses
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "strategies.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")}
    for name, cls in STRATEGIES.items():
        assert name in rows, f"docs/strategies.md has no table row for {name}"
        for f in dataclasses.fields(cls.Params):
            assert f"`{f.name}`" in doc, f"docs/strategies.md does not mention {name}'s parameter {f.name}"


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(
        ConfigError,
        match=r"valid choices: apfl, ditto, fedadam, fedavg, fedavgm, fedbn, .*, local, .*pfedme, scaffold",
    ):
        STRATEGIES.get("nope")


def test_cnn_matches_the_reference_architecture() -> None:
    model = build_model("cnn", (1, 28, 28), 10, 64, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 114_314
    x = torch.zeros(5, 1, 28, 28)
    assert model.features(x).shape == (5, 64)
    assert model(x).shape == (5, 10)


def test_model_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m1 = build_model("cnn", (1, 28, 28), 10, 64, seed=5)
    assert torch.equal(torch.rand(1), before)
    m2 = build_model("cnn", (1, 28, 28), 10, 64, seed=5)
    m3 = build_model("cnn", (1, 28, 28), 10, 64, seed=6)
    w1, w2, w3 = get_weights(m1), get_weights(m2), get_weights(m3)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert not all(np.array_equal(w1[k], w3[k]) for k in w1)
    set_weights(m3, w1)
    assert all(np.array_equal(get_weights(m3)[k], w1[k]) for k in w1)


def test_a_personalizer_cannot_see_test_data() -> None:
    import dataclasses

    from fedmem.strategy import ClientContext, ClientData

    # structural: the only data a strategy or personalizer gets is ctx.data, which has no test split
    assert [f.name for f in dataclasses.fields(ClientData)] == [
        "pid",
        "seen",
        "num_classes",
        "x_train",
        "y_train",
        "x_val",
        "y_val",
    ]
    assert not [f.name for f in dataclasses.fields(ClientContext) if "test" in f.name]


def test_a_scenario_may_carry_the_tables_of_strategies_it_does_not_run() -> None:
    # permuted_marked.toml sets [strategy.perfedavg] and [strategy.mrperfedavg]; FedAvg runs on it
    from fedmem.config import load_config
    from strategies import check_config

    cfg = load_config("permuted_marked", ["strategy.name='fedavg'"])
    assert set(cfg.strategy.params) >= {"perfedavg", "mrperfedavg"}
    check_config(cfg)
    # ... but every such table is still checked, and must name a strategy
    with pytest.raises(ConfigError, match=r"unknown config key 'strategy\.perfedavg\.betta'.* beta"):
        check_config(load_config("permuted_marked", ["strategy.name='fedavg'", "strategy.perfedavg.betta=1"]))
    with pytest.raises(
        ConfigError, match=r"\[strategy\.perfedavgx\] names no known strategy; valid choices: .*perfedavg"
    ):
        check_config(load_config("default", ["strategy.perfedavgx.beta=1"]))
