"""The whole leakage audit of a scenario against one federation of it, in one run of this script.

Measured, in this order:

* ``one``: ``fedmem run SCENARIO`` as a process (wall time of the command: Ray start, data,
  10 rounds, two evaluations, the report);
* ``audit``: ``fedmem audit SCENARIO`` as a process (target + ``audit.shadows`` shadows +
  ``audit.subsamples`` subsampled federations in one Flower session, then the analysis);
* per federation kind: the median ``wall_seconds`` of the audit's run directories (target,
  shadow, subsample) and the analysis time (audit wall minus the federations').

Target (issue 8): audit wall <= 12 x one federation's wall, with 16 shadows, canaries and 32
subsampled federations. Pass ``--set`` options through to both commands (e.g. fewer shadows).

Usage: ``python benchmarks/audit.py [SCENARIO] [--set KEY=VALUE ...]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?", default="default")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    sets = [x for o in args.overrides for x in ("--set", o)]
    fedmem = [sys.executable, "-m", "fedmem.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        one = timed([*fedmem, "run", args.scenario, *sets, "--out", f"{tmp}/run"])
        audit = timed([*fedmem, "audit", args.scenario, *sets, "--out", f"{tmp}/audit"])
        (root,) = Path(f"{tmp}/audit").iterdir()
        walls: dict[str, list[float]] = {}
        for summary in root.glob("*/summary.json"):
            kind = summary.parent.name.split("-")[0]
            walls.setdefault(kind, []).append(json.loads(summary.read_text())["wall_seconds"])
        print(f"scenario {args.scenario} {' '.join(args.overrides)}")
        print(f"one federation (fedmem run, whole command): {one:8.1f} s")
        print(
            f"audit (fedmem audit, whole command):        {audit:8.1f} s"
            f"   = {audit / one:.1f} x one federation"
        )
        total = 0.0
        for kind, w in sorted(walls.items()):
            total += sum(w)
            print(
                f"  {kind:10s} {len(w):3d} federations, median {statistics.median(w):6.1f} s,"
                f" sum {sum(w):7.1f} s"
            )
        print(f"  outside the federations (Ray start, data, scoring analysis, plots): {audit - total:6.1f} s")
        print((root / "report.md").read_text().split("## Figures")[0])


if __name__ == "__main__":
    main()
