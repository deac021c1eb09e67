"""The reading wing only reads: ``fedmem report`` and ``fedmem show`` import no engine.

Neither flwr, Ray, the strategies nor the round loop, the sweeps or the clients are imported to
draw a table; on a run or a sweep directory not even torch (the audit's analysis recomputes
membership from the seed through the data layer, which needs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from fedmem.cli import main
from fedmem.config import load_config
from tests.conftest import TINY

ENGINE = (
    "flwr",
    "ray",
    "strategies",
    "fedmem.simulation",
    "fedmem.sweep",
    "fedmem.client",
    "fedmem.federation",
)

# In a fresh interpreter: run the command, then list every module it imported.
_LIST_IMPORTS = """
import json, sys
from fedmem.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(sys.modules)))
"""


def _imported(*args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _LIST_IMPORTS, *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def _among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    """The ``names`` (packages or modules) of which ``modules`` holds the module or a submodule."""
    return [n for n in names if any(m == n or m.startswith(f"{n}.") for m in modules)]


def test_report_and_show_of_a_run_and_a_sweep_import_no_engine_and_no_torch(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["compare", "default", "--strategies", "fedavg", "--seeds", "0", "--engine", "inprocess"]
    args += ["--out", str(out)]
    for item in TINY:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (sweep,) = out.iterdir()
    run = sweep / "fedavg-s0"
    for command in (["report", str(sweep)], ["report", str(run)], ["show", str(run)]):
        modules = _imported(*command)
        assert "fedmem.reports.tables" in modules  # it did draw the table
        assert _among(modules, (*ENGINE, "torch", "fedmem.audit")) == [], command


def test_report_of_an_audit_imports_no_engine(tmp_path: Path) -> None:
    from fedmem.audit import run_audit

    sets = [*TINY, f"runtime.output_dir='{tmp_path}'", "runtime.engine='inprocess'", "rounds=0"]
    sets += ["audit.shadows=0", "audit.subsamples=0", "audit.references=100", "audit.canary_clients=1"]
    root, _ = run_audit(load_config("default", [*sets, "audit.canaries_per_repetition=2"]))
    modules = _imported("report", str(root))
    assert "fedmem.reports.audit" in modules
    assert _among(modules, (*ENGINE, "fedmem.audit")) == []
