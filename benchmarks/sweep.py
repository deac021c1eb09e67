"""A sweep in one warm session against separate runs and against the bare compute it contains.

Workload: the default scenario (Fashion-MNIST, 20 clients, 16 training), ``rounds`` rounds,
3 strategies x 2 seeds = 6 federations. The strategies (FedAvg, FedAvgM, FedAdam) differ only
on the server, so every federation's client compute is FedAvg's and the bare loop below is the
exact same work. Personalizers are off and evaluation happens once, after the last round, so
the figures measure the engine, not kNN-Per.

Measured in one run of this script, in this order:

* ``bare``: the 6 federations' training in a plain 2-process pool (one thread per worker,
  data loaded before timing): the floor for this machine (``benchmarks/overhead.py``);
* ``sweep``: ``run_sweep`` on Flower, one session for all 6 (wall time of the call);
* ``separate``: 6 x ``fedmem run`` as separate processes (wall time of each command);
* fixed cost of one ``fedmem run``: its command wall time minus its rounds' time;
* per round: median steady round of the sweep's federations vs the bare pool's;
* memory: peak proportional set size (PSS: shared pages split between the processes that
  share them, so summing counts them once) of the whole process tree, sampled every 0.25 s.

Targets (issue 7): sweep wall <= one fixed cost + 1.05 x bare compute; fixed cost <= 8 s
(aim 5 s); Flower round / bare-pool round <= 1.05.

Usage: ``python benchmarks/sweep.py [--rounds 3] [--skip-separate]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from overhead import bare  # this directory is on sys.path when run as a script
from startup import PeakMemory

from fedmem.client import federation
from fedmem.sweep import SweepSpec, expand, run_sweep

STRATEGIES = ("fedavg", "fedavgm", "fedadam")
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-separate", action="store_true", help="Do not time the 6 separate runs.")
    args = parser.parse_args()
    sets = (f"rounds={args.rounds}", f"eval_every={args.rounds}", "eval.personalizers=[]")
    spec = SweepSpec("default", STRATEGIES, SEEDS, sets)
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        extra = [f"runtime.output_dir='{tmp}/sweep'", "runtime.engine='flower'"]
        feds = expand(spec, extra)
        for fed in feds:
            federation(fed.cfg)  # data load outside every timing

        with PeakMemory(interval=0.25) as bare_mem:
            bare_rounds = [bare(fed.cfg, cores) for fed in feds]
        bare_total = sum(sum(r) for r in bare_rounds)
        bare_round = statistics.median(t for r in bare_rounds for t in r[1:])
        torch.set_num_threads(1)

        t0 = time.perf_counter()
        with PeakMemory(interval=0.25) as sweep_mem:
            _, _, outcomes = run_sweep(spec, extra=extra)
        sweep_wall = time.perf_counter() - t0
        assert all(o.status == "complete" for o in outcomes), [o.status for o in outcomes]
        sweep_rounds = [[m["seconds"] for m in o.run.metrics()] for o in outcomes]
        sweep_compute = sum(sum(r) for r in sweep_rounds)
        # round 1 of the first federation carries the actors' warm-up; the last round evaluates
        steady = [t for r in sweep_rounds for t in r[1 : args.rounds - 1 or None]] or [sweep_rounds[0][-1]]
        flower_round = statistics.median(steady)

        separate: list[tuple[float, float]] = []
        if not args.skip_separate:
            for fed in feds:
                out = Path(tmp) / "separate" / fed.name
                cmd = [
                    sys.executable,
                    "-m",
                    "fedmem.cli",
                    "run",
                    "default",
                    "--out",
                    str(out),
                    "--engine",
                    "flower",
                ]
                for item in (*sets, f"strategy.name={fed.strategy!r}", f"seed={fed.seed}"):
                    cmd += ["--set", item]
                start = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                wall = time.perf_counter() - start
                (run_dir,) = out.iterdir()
                lines = (run_dir / "metrics.jsonl").read_text().splitlines()
                rounds = sum(json.loads(line)["seconds"] for line in lines)
                separate.append((wall, rounds))

    print(
        f"workload: 6 federations ({', '.join(STRATEGIES)} x seeds {SEEDS}), default scenario, "
        f"{args.rounds} rounds, {cores} cores"
    )
    print(f"bare {cores}-process pool compute:   {bare_total:7.1f} s  (median round {bare_round:.2f} s)")
    print(
        f"sweep, one Flower session:     {sweep_wall:7.1f} s  (rounds {sweep_compute:.1f} s, "
        f"fixed {sweep_wall - sweep_compute:.1f} s)"
    )
    if separate:
        walls = [w for w, _ in separate]
        fixed = [w - r for w, r in separate]
        print(
            f"6 separate `fedmem run`:       {sum(walls):7.1f} s  (each {min(walls):.1f}-{max(walls):.1f} s)"
        )
        print(
            f"fixed cost of one `fedmem run` (wall - rounds): median {statistics.median(fixed):.1f} s, "
            f"min {min(fixed):.1f}, max {max(fixed):.1f}  (target <= 8 s, aim 5 s)"
        )
        one_fixed = statistics.median(fixed)
        target = one_fixed + 1.05 * bare_total
        print(f"sweep / separate: {sweep_wall / sum(walls):.2f}")
        print(
            f"sweep wall vs one fixed cost + 1.05 x bare compute = {target:.1f} s: "
            f"{'met' if sweep_wall <= target else 'missed'} ({sweep_wall:.1f} s)"
        )
    print(
        f"per round, Flower (steady, {len(steady)} rounds) / bare pool: "
        f"{flower_round:.2f} / {bare_round:.2f} = "
        f"{flower_round / bare_round:.3f}  (target <= 1.05)"
    )
    print(
        f"peak memory of the process tree (PSS): sweep {sweep_mem.peak / 2**30:.2f} GiB, "
        f"bare pool {bare_mem.peak / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
