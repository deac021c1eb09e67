"""Properties of the config boundary over the whole tree, walked from the dataclasses.

Every key of :class:`fedmem.config.Config` and of every registered strategy's ``Params`` is found
by walking the dataclasses, so a key added later is covered without touching this file. For any
value at any key, given in a TOML file or as a ``--set`` override, loading plus the registry's
check either accepts the config or raises :class:`ConfigError` whose message names the key; an
accepted config survives its own TOML snapshot; the defaults stay accepted; ``fedmem run`` prints
a refusal as one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from unittest import mock

import pytest
import tomli_w
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedmem.cli import main
from fedmem.config import Config, load_config
from fedmem.errors import ConfigError
from strategies import STRATEGIES, check_config

# Deterministic in CI, and no example database written into the repository.
PROPERTY = settings(max_examples=300, derandomize=True, database=None, deadline=None)

# What a strategy needs besides its own name to be accepted at all (FedBN keeps BatchNorm layers).
STRATEGY_NEEDS: dict[str, dict[str, Any]] = {"fedbn": {"model": {"name": "cnn_bn"}}}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One key of the tree: its dotted name, its annotation and the raw dict it is set in."""

    key: str
    tp: Any
    base: Mapping[str, Any]  # the rest of the scenario (a strategy's table needs strategy.name)

    def __repr__(self) -> str:  # hypothesis prints the failing example with this
        return f"Leaf({self.key})"


def _walk(cls: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, annotation) of every field of dataclass ``cls``; tables come before their keys."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if get_origin(tp) is dict:
            continue  # strategy.params: the [strategy.<name>] tables, walked from each Params below
        yield key, tp
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{key}.")


def _strategy_base(name: str) -> dict[str, Any]:
    return {"strategy": {"name": name}, **STRATEGY_NEEDS.get(name, {})}


def _leaves() -> list[Leaf]:
    out = [Leaf(key, tp, {}) for key, tp in _walk(Config, "")]
    for name, cls in STRATEGIES.items():
        out += [Leaf(key, tp, _strategy_base(name)) for key, tp in _walk(cls.Params, f"strategy.{name}.")]
    return out


LEAVES = _leaves()
VALUES = [leaf for leaf in LEAVES if not dataclasses.is_dataclass(leaf.tp)]
TABLES = [Leaf("", Config, {})] + [leaf for leaf in LEAVES if dataclasses.is_dataclass(leaf.tp)]
TABLES += [Leaf(f"strategy.{name}", cls.Params, _strategy_base(name)) for name, cls in STRATEGIES.items()]


def _element(tp: Any) -> Any:
    return get_args(tp)[0] if get_origin(tp) is tuple else tp


def _numeric(leaf: Leaf) -> bool:
    return _element(leaf.tp) in (int, float)


def _nested(key: str, value: Any, base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``value`` set at dotted ``key`` (tables copied, never shared)."""
    raw = _copy(base)
    *tables, last = key.split(".")
    node = raw
    for part in tables:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def _copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _inline(value: Any) -> str:
    """``value`` as an inline TOML value, what a user types after ``--set key=``."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_inline(k)} = {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _overrides(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        out += _overrides(v, f"{key}.") if isinstance(v, Mapping) and v else [f"{key}={_inline(v)}"]
    return out


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenarios")


def _load(raw: Mapping[str, Any], via: str, folder: Path) -> Config:
    """Load ``raw`` as a TOML file or as ``--set`` overrides, then run the registry's check."""
    if via == "toml":
        path = folder / "case.toml"
        path.write_text(tomli_w.dumps(raw), encoding="utf-8")
        cfg = load_config(str(path))
    else:
        cfg = load_config("default", _overrides(raw))
    check_config(cfg)
    return cfg


def _outcome(raw: Mapping[str, Any], via: str, folder: Path) -> Config | ConfigError:
    """The loaded config or its ConfigError; any other exception fails the test as it is."""
    try:
        return _load(raw, via, folder)
    except ConfigError as exc:
        return exc


def _assert_refused_naming(result: Config | ConfigError, key: str) -> None:
    assert isinstance(result, ConfigError), f"{key}: accepted"
    assert key in str(result), f"{key}: the message does not name it: {result}"
    assert "\n" not in str(result), f"{key}: not one sentence: {result}"


# ------------------------------------------------------------------------------ values

_SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 0.5, 1.0, 1.5, 1e308, 5e-324, math.nan, math.inf, -math.inf]),
    st.text(max_size=12),
    st.sampled_from(["", " ", "{}", "{0}", "{x}", "{", "}", "{}{}", "a/b", "..", "fedavg", "knnper"]),
)
_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=8)
TOML_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _typed(draw: st.DrawFn, tp: Any) -> Any:
    """A value of the right TOML kind for ``tp``: what a careless but type-correct user writes."""
    if get_origin(tp) is tuple:
        return draw(st.lists(_typed(get_args(tp)[0]), max_size=5))
    if tp is bool:
        return draw(st.booleans())
    if tp is int:
        return draw(st.integers() | st.integers(-3, 40) | st.sampled_from([2**63, 10**400]))
    if tp is float:
        # an integer is a number too (``lr = 1``), and Python's TOML parser reads any length
        wild = st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.just(10**400)
        return draw(wild | st.floats(-2, 2))
    return draw(st.text(max_size=12) | st.sampled_from(["", "fedavg", "flat", "iid", "{}{}{}{}{}{}"]))


# ------------------------------------------------------------------------------ properties


def test_the_walk_finds_every_table_and_strategy_parameter() -> None:
    keys = {leaf.key for leaf in LEAVES}
    assert {"seed", "strategy.lr", "memory.lambda_grid", "runtime.output_dir", "strategy.fedprox.mu"} <= keys
    assert {"strategy.ifca.clusters", "strategy.pfedme.inner_steps"} <= keys
    assert {t.key for t in TABLES} >= {"", "data", "runtime", "audit", "strategy.fedadam"}


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_with_its_table_spelled_out_is_accepted(
    name: str, via: str, scenario_dir: Path
) -> None:
    params = dataclasses.asdict(STRATEGIES.get(name).Params())
    raw = _strategy_base(name)
    if params:
        raw["strategy"][name] = params
    cfg = _load(raw, via, scenario_dir)
    assert STRATEGIES.get(name).parse_params(cfg) == STRATEGIES.get(name).Params()


@PROPERTY
@given(leaf=st.sampled_from(LEAVES), value=TOML_VALUES, via=st.sampled_from(["toml", "set"]))
def test_any_value_at_any_key_is_accepted_or_refused_naming_the_key(
    leaf: Leaf, value: Any, via: str, scenario_dir: Path
) -> None:
    result = _outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir)
    if isinstance(result, ConfigError):
        _assert_refused_naming(result, leaf.key)
    else:
        _assert_survives_its_snapshot(result, scenario_dir)


@PROPERTY
@given(data=st.data(), via=st.sampled_from(["toml", "set"]))
def test_any_value_of_the_right_kind_is_accepted_or_refused_naming_the_key(
    data: st.DataObject, via: str, scenario_dir: Path
) -> None:
    leaf = data.draw(st.sampled_from(VALUES))
    value = data.draw(_typed(leaf.tp))
    result = _outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir)
    if isinstance(result, ConfigError):
        _assert_refused_naming(result, leaf.key)
    else:
        _assert_survives_its_snapshot(result, scenario_dir)


def _assert_survives_its_snapshot(cfg: Config, folder: Path) -> None:
    """What ``fedmem run`` writes as ``config.toml`` loads back to the same config."""
    path = folder / f"{cfg.name}.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    again = load_config(str(path))
    check_config(again)
    assert again == cfg


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _element(v.tp) is float], ids=repr)
def test_nan_and_infinity_are_refused_in_every_float(leaf: Leaf, via: str, scenario_dir: Path) -> None:
    for bad in (math.nan, math.inf, -math.inf):
        value = [bad] if get_origin(leaf.tp) is tuple else bad
        _assert_refused_naming(_outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir), leaf.key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _numeric(v)], ids=repr)
def test_negative_numbers_are_refused_everywhere(leaf: Leaf, via: str, scenario_dir: Path) -> None:
    # No count, size, rate or weight of the tree has a meaning below zero.
    for bad in (-1, -(2**63)) if _element(leaf.tp) is int else (-1.0, -1e-300):
        value = [bad] if get_origin(leaf.tp) is tuple else bad
        _assert_refused_naming(_outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir), leaf.key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _numeric(v)], ids=repr)
def test_integers_beyond_64_bits_are_refused(leaf: Leaf, via: str, scenario_dir: Path) -> None:
    for bad in (2**63, 10**400):
        value = [bad] if get_origin(leaf.tp) is tuple else bad
        _assert_refused_naming(_outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir), leaf.key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _element(v.tp) is not str], ids=repr)
def test_a_string_where_a_number_flag_or_list_belongs_is_refused(
    leaf: Leaf, via: str, scenario_dir: Path
) -> None:
    for bad in ("1", "", {"a": 1}, [[1]]):
        _assert_refused_naming(_outcome(_nested(leaf.key, bad, leaf.base), via, scenario_dir), leaf.key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _element(v.tp) is str], ids=repr)
def test_a_number_or_table_where_a_string_belongs_is_refused(
    leaf: Leaf, via: str, scenario_dir: Path
) -> None:
    for bad in (1, 0.5, True, {"a": "b"}, [["x"]]):
        _assert_refused_naming(_outcome(_nested(leaf.key, bad, leaf.base), via, scenario_dir), leaf.key)


# Keys whose name says they are a fraction or a decay: above 1 they mean nothing (momentum 1 never forgets).
_AT_MOST_ONE = re.compile(r"fraction|momentum|\.beta\d$|lambda_grid|apfl\.alpha$")
# Keys that divide, step or count something: zero makes no progress or divides by it.
_POSITIVE = re.compile(
    r"(^|\.)(server_|personal_)?lr$|batch_size|num_clients|classes_per_client|embedding_dim|seq_len|eval_every|"
    r"cpus_per_client|partition\.alpha$|k_grid|repetitions|canaries_per_repetition|references|"
    r"nprobe|hnsw_m|ef_search|\.clusters$|inner_steps|head_epochs|local_epochs|\.tau$|pfedme\.(lam|beta)$"
)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _AT_MOST_ONE.search(v.key)], ids=repr)
def test_fractions_above_one_are_refused(leaf: Leaf, via: str, scenario_dir: Path) -> None:
    value = [1.5] if get_origin(leaf.tp) is tuple else 1.5
    _assert_refused_naming(_outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir), leaf.key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _POSITIVE.search(v.key)], ids=repr)
def test_zero_is_refused_where_a_positive_value_is_needed(leaf: Leaf, via: str, scenario_dir: Path) -> None:
    zero = 0 if _element(leaf.tp) is int else 0.0
    value = [zero] if get_origin(leaf.tp) is tuple else zero
    _assert_refused_naming(_outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir), leaf.key)


def test_the_positive_and_fraction_patterns_match_real_keys() -> None:
    # A renamed key must not silently drop out of the two tests above.
    assert {"strategy.lr", "finetune.lr", "strategy.fedadam.tau", "strategy.pfedme.personal_lr"} <= {
        v.key for v in VALUES if _POSITIVE.search(v.key)
    }
    assert {"partition.unseen_fraction", "strategy.momentum", "strategy.fedadam.beta2"} <= {
        v.key for v in VALUES if _AT_MOST_ONE.search(v.key)
    }


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("leaf", [v for v in VALUES if _element(v.tp) is str], ids=repr)
def test_nul_characters_are_refused_in_every_string(leaf: Leaf, via: str, scenario_dir: Path) -> None:
    # A path with NUL makes the OS layer raise ValueError, long after loading.
    value = ["knn\x00per"] if get_origin(leaf.tp) is tuple else "runs\x00"
    _assert_refused_naming(_outcome(_nested(leaf.key, value, leaf.base), via, scenario_dir), leaf.key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("key", ["memory.k_grid", "memory.lambda_grid", "audit.repetitions"])
def test_empty_lists_are_refused_where_a_choice_is_needed(key: str, via: str, scenario_dir: Path) -> None:
    _assert_refused_naming(_outcome(_nested(key, [], {}), via, scenario_dir), key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("key", ["name", "data.dataset", "partition.scheme", "model.name", "strategy.name"])
def test_empty_names_are_refused(key: str, via: str, scenario_dir: Path) -> None:
    _assert_refused_naming(_outcome(_nested(key, "", {}), via, scenario_dir), key)


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("table", TABLES, ids=repr)
def test_unknown_keys_are_refused_in_every_table(table: Leaf, via: str, scenario_dir: Path) -> None:
    key = f"{table.key}.no_such_key" if table.key else "no_such_key"
    for value in (1, "x", [1.0], {"inner": 1}):
        result = _outcome(_nested(key, value, table.base), via, scenario_dir)
        _assert_refused_naming(result, key)
        assert not str(result).endswith(": "), "the valid keys, or that there are none, are said"


@pytest.mark.parametrize("via", ["toml", "set"])
@pytest.mark.parametrize("table", TABLES[1:], ids=repr)
def test_a_value_where_a_table_belongs_is_refused(table: Leaf, via: str, scenario_dir: Path) -> None:
    for value in (1, "x", [1.0], True):
        raw = _nested(table.key, value, table.base)
        _assert_refused_naming(_outcome(raw, via, scenario_dir), table.key)


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(leaf=st.sampled_from(LEAVES), value=TOML_VALUES)
def test_the_command_line_prints_each_refusal_as_one_line(leaf: Leaf, value: Any, scenario_dir: Path) -> None:
    out = scenario_dir / "runs"
    # the engine and output go first, as --set, so that the case's own value of them wins
    runtime = {"runtime": {"engine": "inprocess", "output_dir": str(out)}}
    raw = _nested(leaf.key, value, {**runtime, **leaf.base})
    result = _outcome(raw, "set", scenario_dir)
    assume(isinstance(result, ConfigError))
    args = ["run"]
    for item in _overrides(raw):
        args += ["--set", item]
    with mock.patch("fedmem.jobs.run_scenario", side_effect=AssertionError("a run started")):
        shown = CliRunner().invoke(main, args)
    assert (shown.exit_code, shown.output) == (2, f"error: {result}\n")
    assert not out.exists()
