from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmem.config import SIMULATIONS_DIR, Config, from_json, load_config
from fedmem.errors import ConfigError


def test_default_toml_spells_out_the_builtin_defaults() -> None:
    assert load_config(str(SIMULATIONS_DIR / "default.toml")) == Config()


def test_every_shipped_scenario_loads() -> None:
    for path in SIMULATIONS_DIR.glob("*.toml"):
        assert load_config(str(path)).name == path.stem


def test_overrides_are_typed_and_dotted() -> None:
    cfg = load_config(
        "default", ["strategy.lr=0.05", "rounds=5", "strategy.name=local", "memory.k_grid=[1, 2]"]
    )
    assert cfg.strategy.lr == 0.05
    assert cfg.rounds == 5
    assert cfg.strategy.name == "local"  # a bare word is read as a string
    assert cfg.memory.k_grid == (1, 2)
    assert isinstance(load_config("default", ["strategy.lr=1"]).strategy.lr, float)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("strategy.lrr=0.1", ["'strategy.lrr'", "lr", "momentum"]),
        ("roundz=3", ["'roundz'", "rounds"]),
        ("rounds='ten'", ["rounds must be an integer", "'ten'"]),
        ("rounds=true", ["rounds must be an integer"]),
        ("memory.k_grid=5", ["memory.k_grid must be a list of an integer"]),
        ("data.dataset=cifar", ["data.dataset = 'cifar'", "fashion_mnist"]),
        ("partition.scheme=shards", ["partition.scheme = 'shards'", "dirichlet", "iid", "pathological"]),
        ("memory.index=lsh", ["memory.index = 'lsh'", "flat", "hnsw", "ivf"]),
        ("model.name=resnet", ["model.name = 'resnet'", "cnn"]),
        ("runtime.engine=spark", ["runtime.engine", "flower", "inprocess"]),
        ("partition.alpha=0", ["partition.alpha must be > 0"]),
        ("partition.train_fraction=0.9", ["partition.train_fraction", "sum to less than 1"]),
        ("strategy.fraction_fit=0", ["strategy.fraction_fit"]),
        ("memory.lambda_grid=[0.5, 2.0]", ["memory.lambda_grid"]),
        ("strategy.params=3", ["strategy.params is not a key"]),
        ("memory.temperature=-1", ["memory.temperature must be >= 0"]),
        ("update.noise_multiplier=1.0", ["update.noise_multiplier", "update.clip_norm > 0"]),
        ("strategy=3", ["strategy"]),
        ("rounds.x=3", ["rounds is a value, not a table"]),
    ],
)
def test_bad_config_names_the_key_and_the_choices(override: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("default", [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"KEY=VALUE"):
        load_config("default", ["rounds"])


def test_unknown_scenario_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"valid names: .*default"):
        load_config("no-such-scenario")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"rounds = = 3", r"bad\.toml is not valid TOML"),
        (
            b'\xff\xfename = "x"\n',
            r"bad\.toml is not UTF-8 text \(byte 0 cannot be decoded\); save it as UTF-8",
        ),
        # the name names the run directory: a path would write the run outside --out
        (b'name = "a/../../escape"\n', r"^name = 'a/../../escape' must be a plain name"),
    ],
)
def test_a_bad_scenario_file_is_one_sentence_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(str(bad))


def test_scenario_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text("rounds = 3\n[strategy]\nlr = 0.1\n")
    cfg = load_config(str(path))
    assert (cfg.name, cfg.rounds, cfg.strategy.lr) == ("mine", 3, 0.1)


def test_json_and_toml_round_trips(tmp_path: Path) -> None:
    cfg = load_config("default", ["strategy.lr=0.2", "memory.k_grid=[7]", "eval.personalizers=['knnper']"])
    assert from_json(cfg.to_json()) == cfg
    path = tmp_path / "snap.toml"
    path.write_text(cfg.to_toml())
    assert dataclasses.replace(load_config(str(path)), name=cfg.name) == cfg


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["strategy.name=fedfoo"], ["strategy.name = 'fedfoo'", "fedavg", "knnper", "local", "finetune"]),
        (["eval.personalizers=['fedfoo']"], ["eval.personalizers contains 'fedfoo'", "knnper"]),
        # a table of a strategy not in use is allowed (scenarios switch with --set) but checked
        (["strategy.fedprox.muu=0.1"], ["unknown config key 'strategy.fedprox.muu'", "mu"]),
        (["strategy.fedfoo.mu=0.1"], ["[strategy.fedfoo] names no known strategy", "fedprox"]),
        (["strategy.knnper.k=3"], ["unknown config key 'strategy.knnper.k'"]),
        (["strategy.name=ifca", "strategy.ifca.clusters=0"], ["strategy.ifca.clusters must be at least 1"]),
        (["strategy.name=ditto", "strategy.ditto.lam='big'"], ["strategy.ditto.lam must be a number"]),
    ],
)
def test_strategy_names_and_tables_are_checked_where_the_registry_lives(
    overrides: list[str], fragments: list[str]
) -> None:
    from strategies import check_config

    cfg = load_config("default", overrides)  # config.py alone knows no strategy names
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_a_strategy_that_needs_the_model_is_checked_once_before_a_run(
    tiny_config: Callable[..., Config],
) -> None:
    from fedmem.jobs import preflight

    with pytest.raises(ConfigError) as info:  # FedBN's check builds the model: once, not per client
        preflight(tiny_config("strategy.name=fedbn"))
    assert 'set model.name = "cnn_bn"' in str(info.value)


def test_config_module_does_not_import_the_strategies() -> None:
    import subprocess
    import sys

    code = "import sys, fedmem.config; sys.exit(int('strategies' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_kernel_temperature_follows_the_embedding_size_unless_set() -> None:
    assert load_config("default", ["model.embedding_dim=128"]).kernel_temperature == 128.0
    assert load_config("default", ["memory.temperature=10"]).kernel_temperature == 10.0


def test_more_cpus_per_client_than_available_is_refused_before_anything_starts() -> None:
    import os

    have = os.cpu_count() or 1
    with pytest.raises(
        ConfigError, match=rf"runtime.cpus_per_client = {have + 1} is more than the {have} CPUs"
    ):
        load_config("default", [f"runtime.cpus_per_client={have + 1}"])
    with pytest.raises(ConfigError, match=r"more than the 1 CPUs available \(runtime.num_cpus\)"):
        load_config("default", ["runtime.num_cpus=1", "runtime.cpus_per_client=2"])
    assert load_config("default", [f"runtime.cpus_per_client={have}"]).runtime.cpus_per_client == have


def _float_keys(node: object, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys += _float_keys(value, key + ".")
        elif isinstance(value, float):
            keys.append(key)
    return keys


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_nan_and_infinity_naming_the_key(value: str) -> None:
    keys = _float_keys(Config())
    assert "strategy.lr" in keys and "memory.temperature" in keys and len(keys) >= 10
    for key in keys:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got {value}$"):
            load_config("default", [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"^memory.lambda_grid must hold finite numbers"):
        load_config("default", [f"memory.lambda_grid=[0.5, {value}]"])
    with pytest.raises(ConfigError, match=r"^strategy.fedprox.mu must be a finite number"):
        load_config("default", ["strategy.name=fedprox", f"strategy.fedprox.mu={value}"])


@pytest.mark.parametrize("key", ["nprobe", "hnsw_m", "ef_search"])
def test_faiss_search_parameters_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"memory.{key} must be >= 1, got 0"):
        load_config("default", [f"memory.{key}=0"])


TOML_INT = "(a TOML integer)"


def test_ranges_are_checked_by_build_dataclass_with_the_interval_as_written() -> None:
    from fedmem.config import build_dataclass, within

    @dataclasses.dataclass(frozen=True)
    class Tiny:
        rate: float = dataclasses.field(default=0.5, metadata=within("(0, 1]"))
        counts: tuple[int, ...] = (1, 2)

    assert build_dataclass(Tiny, {"rate": 1, "counts": [0, 3]}, "t.") == Tiny(1.0, (0, 3))
    cases: list[tuple[dict[str, object], str]] = [
        ({"rate": 0}, "t.rate must be in (0, 1], got 0.0"),
        ({"rate": 1.5}, "t.rate must be in (0, 1], got 1.5"),
        ({"rate": float("nan")}, "t.rate must be a finite number, got nan"),
        ({"counts": [1, -2]}, "t.counts must hold values >= 0, got [1, -2]"),
        ({"counts": [2**63]}, f"t.counts[0] must be between -2**63 and 2**63 - 1 {TOML_INT}, got {2**63}"),
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as info:
            build_dataclass(Tiny, table, "t.")
        assert str(info.value) == message
    with pytest.raises(ValueError, match=r"interval '0\.\.1' is not written like"):
        within("0..1")


def test_a_strategy_parameter_out_of_its_range_names_the_key_and_the_range() -> None:
    from strategies import check_config

    cfg = load_config("default", ["strategy.name=fedyogi", "strategy.fedyogi.beta2=1"])
    with pytest.raises(ConfigError, match=r"^strategy\.fedyogi\.beta2 must be in \[0, 1\), got 1\.0$"):
        check_config(cfg)
    cfg = load_config("default", ["strategy.name=fedprox", "strategy.fedprox.mu=-0.5"])
    with pytest.raises(ConfigError, match=r"^strategy\.fedprox\.mu must be >= 0, got -0\.5$"):
        check_config(cfg)


def _numeric_fields_on_the_default_range(cls: type, prefix: str = "") -> list[str]:
    from typing import get_args, get_origin, get_type_hints

    from fedmem.config import declaration

    hints, keys = get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _numeric_fields_on_the_default_range(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif (get_args(tp)[0] if get_origin(tp) is tuple else tp) in (int, float):
            keys += [f"{prefix}{f.name}"] if declaration(f).interval is None else []
    return keys


def test_every_number_declares_its_range_or_is_deliberately_unbounded_above() -> None:
    # A new numeric key must either declare its interval on its field or be added here on purpose.
    # Those marked * are bounded by another key, in validate (the link names both).
    unbounded = {
        "seed",
        "rounds",
        "data.max_samples",
        "data.noisy_clients",  # * each below partition.num_clients
        "partition.min_size",
        "strategy.weight_decay",
        "strategy.local_steps",
        "strategy.winsor_c",  # * below half of strategy.batch_size (winsorized)
        "strategy.dp_noise",
        "finetune.epochs",
        "memory.capacity",
        "memory.temperature",
        "memory.embedding_noise",
        "eval.adapt_steps",
        "update.clip_norm",
        "update.noise_multiplier",  # * needs update.clip_norm > 0
        "update.clip_lr",
        "update.count_noise_std",  # * above update.noise_multiplier / 2 (adaptive clipping)
        "audit.canary_clients",
        "audit.index",  # * below audit.shadows or audit.subsamples
        "runtime.num_cpus",
        "runtime.round_timeout",
        "runtime.checkpoint_every",
    }
    assert set(_numeric_fields_on_the_default_range(Config)) == unbounded


def test_a_declaration_checks_boundaries_lists_choices_and_its_own_test_exactly() -> None:
    from fedmem.config import build_dataclass, setting

    def even(value: int, key: str) -> None:
        if value % 2:
            raise ConfigError(f"{key} must be even, got {value}")

    @dataclasses.dataclass(frozen=True)
    class Tiny:
        closed: float = setting(0.5, "[0, 1]")
        open_: float = setting(0.5, "(0, 1)")
        positive: float = setting(1.0, "(0, inf)")
        count: int = setting(4, "0 or [4, inf)", hint="(0 = off)")
        grid: tuple[int, ...] = setting((1, 2), "[1, inf)", nonempty=True, distinct=True)
        mode: str = setting("a", choices=("a", "b"))
        worded: str = setting("x", choices=("x", "y"), message="{key} must be one of {valid}, got {value!r}")
        pairs: int = setting(2, check=even)

    accepted: list[dict[str, object]] = [
        {"closed": 0},
        {"closed": 1},
        {"open_": 1e-9},
        {"count": 0},
        {"count": 4},
        {"grid": [3]},
    ]
    for table in accepted:
        build_dataclass(Tiny, table, "t.")
    cases: list[tuple[dict[str, object], str]] = [
        ({"closed": -0.1}, "t.closed must be in [0, 1], got -0.1"),
        ({"open_": 0}, "t.open_ must be in (0, 1), got 0.0"),
        ({"open_": 1}, "t.open_ must be in (0, 1), got 1.0"),
        ({"positive": 0}, "t.positive must be > 0, got 0.0"),
        ({"count": 3}, "t.count must be 0 or at least 4 (0 = off), got 3"),
        ({"count": -1}, "t.count must be 0 or at least 4 (0 = off), got -1"),
        ({"grid": []}, "t.grid must be a non-empty list of distinct values >= 1, got []"),
        ({"grid": [2, 2]}, "t.grid must be a non-empty list of distinct values >= 1, got [2, 2]"),
        ({"grid": [1, 0]}, "t.grid must be a non-empty list of distinct values >= 1, got [1, 0]"),
        ({"mode": "c"}, "t.mode = 'c' is not known; valid choices: 'a', 'b'"),
        ({"worded": "z"}, "t.worded must be one of x, y, got 'z'"),
        ({"pairs": 3}, "t.pairs must be even, got 3"),
        ({"pairs": -2}, "t.pairs must be >= 0, got -2"),  # the range first, then the field's own test
    ]
    for table, message in cases:
        with pytest.raises(ConfigError) as info:
            build_dataclass(Tiny, table, "t.")
        assert str(info.value) == message

    @dataclasses.dataclass(frozen=True)
    class Model:
        name: str = setting("cnn", choices="MODELS")

    # a lower layer's registry is looked up when a value is checked, and it words the refusal
    with pytest.raises(ConfigError, match=r"^model\.name = 'resnet' is not a known model; valid choices: "):
        build_dataclass(Model, {"name": "resnet"}, "model.")


def test_a_table_whose_keys_constrain_each_other_checks_them_in_its_check_hook() -> None:
    from fedmem.config import build_dataclass, setting

    @dataclasses.dataclass(frozen=True)
    class Window:
        low: int = 0
        high: int = setting(2, "[1, inf)")

        def check(self, prefix: str) -> None:
            if self.low >= self.high:
                raise ConfigError(f"{prefix}low must be below {prefix}high ({self.high}), got {self.low}")

    assert build_dataclass(Window, {"low": 1}, "w.") == Window(1, 2)
    with pytest.raises(ConfigError, match=r"^w\.low must be below w\.high \(2\), got 2$"):
        build_dataclass(Window, {"low": 2}, "w.")
    with pytest.raises(ConfigError, match=r"^w\.high must be >= 1, got 0$"):  # fields first
        build_dataclass(Window, {"low": 5, "high": 0}, "w.")
