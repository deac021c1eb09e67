"""No untrusted pickle is ever loaded: a structural scan of the sources of fedmem/ and strategies/.

A pickle runs code while it loads, so a run directory, checkpoint or data file from someone else
must never reach a full unpickler. Allowed: ``torch.load(..., weights_only=True)``, ``np.load``
without ``allow_pickle=True``, and the one restricted CIFAR unpickler of fedmem/data/datasets.py
(a ``pickle.Unpickler`` subclass whose ``find_class`` admits only what a CIFAR batch holds).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("fedmem", "strategies")
CIFAR_UNPICKLER = Path("fedmem/data/datasets.py")
# Modules whose loaders unpickle (or run code) whatever the file holds.
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a chain of names and attributes, "" for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _is(node: ast.expr, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, path: Path) -> list[str]:
    """``"<path>:<line>: <what>"`` for every way ``source`` could unpickle untrusted bytes."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    cifar = path == CIFAR_UNPICKLER
    safe_torch_loads: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        weights_only = any(k.arg == "weights_only" and _is(k.value, True) for k in node.keywords)
        if _dotted(node.func) == "torch.load" and weights_only:
            safe_torch_loads.add(id(node.func))
        if any(k.arg == "allow_pickle" and not _is(k.value, False) for k in node.keywords):
            found.append((node.lineno, "allow_pickle other than False"))
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in UNSAFE_MODULES and not (cifar and alias.name == "pickle"):
                    found.append((line, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            if top in UNSAFE_MODULES:
                found.append((line, f"from {node.module} import ..."))
            if top == "torch" and any(a.name == "load" for a in node.names):
                found.append((line, "from torch import load"))
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name == "torch.load" and id(node) not in safe_torch_loads:
                found.append((line, "torch.load without weights_only=True"))
            elif name.startswith("pickle.") and not (cifar and name in _CIFAR_PICKLE_NAMES):
                found.append((line, name))
            elif node.attr == "read_pickle":
                found.append((line, name or "read_pickle"))
        elif isinstance(node, ast.ClassDef) and any(_dotted(b) == "pickle.Unpickler" for b in node.bases):
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            if "find_class" not in methods:
                found.append(
                    (line, f"{node.name} subclasses pickle.Unpickler without restricting find_class")
                )
    return [f"{path}:{line}: {what}" for line, what in sorted(found)]


# The CIFAR unpickler's base class and the error it raises; never pickle.load / pickle.loads.
_CIFAR_PICKLE_NAMES = {"pickle.Unpickler", "pickle.UnpicklingError"}


def test_no_source_can_load_an_untrusted_pickle() -> None:
    sources = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(sources) > 30 and ROOT / CIFAR_UNPICKLER in sources
    problems = [
        problem
        for p in sources
        for problem in unsafe_loads(p.read_text(encoding="utf-8"), p.relative_to(ROOT))
    ]
    assert problems == []


@pytest.mark.parametrize(
    ("source", "what"),
    [
        ("import torch\ntorch.load(path)\n", "torch.load without weights_only=True"),
        ("import torch\ntorch.load(path, weights_only=False)\n", "torch.load without weights_only=True"),
        ("import torch\nload = torch.load\n", "torch.load without weights_only=True"),
        ("from torch import load\n", "from torch import load"),
        ("import numpy as np\nnp.load(p, allow_pickle=True)\n", "allow_pickle other than False"),
        ("import numpy as np\nnp.load(p, allow_pickle=flag)\n", "allow_pickle other than False"),
        ("import pickle\npickle.loads(b)\n", "import pickle"),
        ("from pickle import loads\n", "from pickle import ..."),
        ("import joblib\n", "import joblib"),
        ("import pandas as pd\npd.read_pickle(p)\n", "pd.read_pickle"),
    ],
)
def test_the_scan_finds_each_way_to_unpickle(source: str, what: str) -> None:
    assert any(p.endswith(what) for p in unsafe_loads(source, Path("fedmem/x.py")))


def test_the_cifar_exception_is_only_a_restricted_unpickler() -> None:
    restricted = (
        "import pickle\n"
        "class U(pickle.Unpickler):\n"
        "    def find_class(self, module, name):\n"
        "        raise pickle.UnpicklingError(name)\n"
    )
    assert unsafe_loads(restricted, CIFAR_UNPICKLER) == []
    assert unsafe_loads(restricted, Path("fedmem/other.py")) != []  # only that one file
    unrestricted = "import pickle\nclass U(pickle.Unpickler):\n    pass\n"
    assert unsafe_loads(unrestricted, CIFAR_UNPICKLER) == [
        f"{CIFAR_UNPICKLER}:2: U subclasses pickle.Unpickler without restricting find_class"
    ]
    assert unsafe_loads("import pickle\npickle.load(f)\n", CIFAR_UNPICKLER) == [
        f"{CIFAR_UNPICKLER}:2: pickle.load"
    ]
    safe = "import torch\nimport numpy as np\ntorch.load(p, weights_only=True)\nnp.load(p)\n"
    assert unsafe_loads(safe, Path("fedmem/x.py")) == []
