"""The house rules of docs/architecture.md, read from the source: who may import whom.

Imports are read with ``ast`` (function-level imports included), so a rule broken inside a
function body fails here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The engine, from the ground up (docs/architecture.md, "The house, as built"); a module may import
# modules of its own layer or below, never above. Reports and the CLI sit beside the engine.
LAYERS: list[tuple[str, ...]] = [
    ("fedmem.errors", "fedmem.seeding", "fedmem.updates", "fedmem.registry"),
    (
        "fedmem.probes",
        "fedmem.server_optimizers",
        "fedmem.results",
        "fedmem.memory",
        "fedmem.data",
        "fedmem.models",
    ),
    ("fedmem.training", "fedmem.leakage"),
    ("fedmem.config",),
    ("fedmem.losses", "fedmem.federated_data"),
    ("fedmem.strategy",),
    ("fedmem.privacy", "fedmem.canary_scoring", "strategies"),
    ("fedmem.client",),
    ("fedmem.simulation",),
    ("fedmem.jobs",),
    ("fedmem.federation",),
    ("fedmem.sweep", "fedmem.audit"),
    ("fedmem.cli",),
]
ENGINE = (
    "fedmem.client",
    "fedmem.simulation",
    "fedmem.jobs",
    "fedmem.federation",
    "fedmem.sweep",
    "fedmem.audit",
)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources() -> dict[str, set[str]]:
    files = [*sorted((ROOT / "fedmem").rglob("*.py")), *sorted((ROOT / "strategies").glob("*.py"))]
    return {_module(p): _imports(p) for p in files}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _layer(name: str) -> int | None:
    for index, members in enumerate(LAYERS):
        if any(_within(name, m) for m in members):
            return index
    return None


def test_every_engine_module_has_a_layer() -> None:
    unplaced = [
        m for m in _sources() if _layer(m) is None and not _within(m, "fedmem.reports") and m != "fedmem"
    ]
    assert not unplaced, f"add {unplaced} to LAYERS (and to docs/architecture.md)"


def test_no_module_imports_one_above_it() -> None:
    wrong = []
    for module, imported in _sources().items():
        own = _layer(module)
        if own is None:
            continue
        for name in imported:
            other = _layer(name)
            if other is not None and other > own:
                wrong.append(f"{module} (layer {own}) imports {name} (layer {other})")
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("library", ["flwr", "ray"])
def test_only_the_federation_package_imports_flower_and_ray(library: str) -> None:
    users = sorted(m for m, imported in _sources().items() if any(_within(n, library) for n in imported))
    assert users and all(_within(m, "fedmem.federation") for m in users), users


def test_the_reading_wing_imports_no_engine_and_no_strategy() -> None:
    wing = {m: imported for m, imported in _sources().items() if _within(m, "fedmem.reports")}
    assert wing
    for module, imported in wing.items():
        bad = sorted(
            n for n in imported if any(_within(n, e) for e in (*ENGINE, "strategies", "fedmem.strategy"))
        )
        assert not bad, f"{module} imports {bad}"


def test_config_imports_no_strategy_and_strategies_no_data_pipeline() -> None:
    sources = _sources()
    assert not [
        n for n in sources["fedmem.config"] if _within(n, "strategies") or _within(n, "fedmem.strategy")
    ]
    for module, imported in sources.items():
        if _within(module, "strategies"):
            assert not [n for n in imported if _within(n, "fedmem.federated_data")], module
