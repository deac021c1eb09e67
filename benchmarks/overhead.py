"""Flower-path overhead: fedmem's Flower run vs a bare PyTorch loop doing identical training.

Workload: Fashion-MNIST, N clients (all training, none held out), 1 local epoch
of SGD per round, the 114k-parameter CNN. Three ways, measured in one process
run:

* ``flower``: ``fedmem`` through Flower's Ray simulation engine (one CPU per actor);
* ``bare-inprocess``: a plain loop in this process (torch using every core);
* ``bare-pool``: the same loop spread over a process pool with one thread per
  worker, the best a 2-core machine can do without any framework.

Per-round time is the median of the rounds that neither start actors nor
evaluate; fixed cost is the Flower run's wall time minus its rounds, the first
counted as a steady round (so: Ray start, actor start with torch import and
data load, shutdown).
Targets (issue 2): per round <= 1.15x the bare in-process loop; fixed cost <= 10 s.
``--scenario text`` measures the natural text federation (character GRU on the
stdlib corpus, ``strategy.local_steps`` per client) against the same bare loops
on the same windows; target (issue 9): per round <= 1.10x the bare loop.

Usage: ``python benchmarks/overhead.py [--scenario default] [--rounds 6] [--clients 20] [--max-samples 0]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from fedmem.client import client_data, federation, initial_weights
from fedmem.config import Config, load_config
from fedmem.federation.sessions import run_on_engine
from fedmem.jobs import Monitor
from fedmem.strategy import ClientContext, Weights, get_weights, set_weights
from fedmem.updates import weighted_average

_CFG: Config | None = None


def _init_worker(cfg: Config) -> None:
    global _CFG
    torch.set_num_threads(1)
    _CFG = cfg
    for pid in range(cfg.partition.num_clients):  # load and cache the data once per worker, as actors do
        client_data(cfg, pid)


def _train_one(args: tuple[int, int, Weights]) -> tuple[int, Weights]:
    pid, server_round, weights = args
    assert _CFG is not None
    return _train(_CFG, pid, server_round, weights)


def _train(cfg: Config, pid: int, server_round: int, weights: Weights) -> tuple[int, Weights]:
    from fedmem.training import train

    ctx = ClientContext(cfg, pid, server_round, client_data(cfg, pid)[0])
    model = ctx.new_model()
    set_weights(model, weights)
    train(model, ctx.data.x_train, ctx.data.y_train, ctx.sgd(), ctx.rng("fit"))
    return len(ctx.data.y_train), get_weights(model)


def bare(cfg: Config, workers: int) -> list[float]:
    """Per-round seconds of a plain FedAvg loop (workers = 0: in this process)."""
    weights = initial_weights(cfg)
    pids = list(federation(cfg).seen)
    times = []
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg,)) if workers else None
    if pool is not None:  # warm the workers outside the timed rounds
        list(pool.map(_init_worker_noop, range(workers)))
    try:
        for r in range(1, cfg.rounds + 1):
            start = time.perf_counter()
            if pool is None:
                replies = [_train(cfg, p, r, weights) for p in pids]
            else:
                replies = list(pool.map(_train_one, [(p, r, weights) for p in pids]))
            weights = weighted_average([w for _, w in replies], [n for n, _ in replies])
            times.append(time.perf_counter() - start)
    finally:
        if pool is not None:
            pool.shutdown()
    return times


def _init_worker_noop(_: int) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="default", help="a scenario name or path (default, text)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=0, help="0: the scenario's")
    parser.add_argument("--max-samples", type=int, default=0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            args.scenario,
            [
                f"rounds={args.rounds}",
                f"eval_every={args.rounds}",
                *([f"partition.num_clients={args.clients}"] if args.clients else []),
                "partition.unseen_fraction=0.0",
                f"data.max_samples={args.max_samples}",
                "eval.personalizers=[]",
                f"runtime.output_dir='{tmp}'",
            ],
        )
        federation(cfg)  # data load outside every timing
        ends: list[float] = []
        t0 = time.perf_counter()

        class Ends(Monitor):
            def round(self, server_round: int, record: Mapping[str, Any]) -> None:
                ends.append(time.perf_counter())

        run = run_on_engine(cfg.with_runtime(engine="flower"), monitor=Ends())
        flower_wall = time.perf_counter() - t0
        flower_rounds = [m["seconds"] for m in run.metrics()]
        seen = federation(cfg).seen
        if cfg.strategy.local_steps:  # every client processes steps x batch examples a round
            samples = len(seen) * cfg.strategy.local_steps * cfg.strategy.batch_size
        else:
            samples = sum(len(client_data(cfg, p)[0].y_train) for p in seen)

        torch.set_num_threads(cores)
        bare_in = bare(cfg, 0)
        bare_pool = bare(cfg, cores)

    steady = flower_rounds[1:-1] or flower_rounds
    flower_round = statistics.median(steady)
    bare_in_round = statistics.median(bare_in[1:])
    bare_pool_round = statistics.median(bare_pool[1:])
    # the first round's excess over a steady round is actor warm-up (data load, first kernels)
    fixed = flower_wall - sum(flower_rounds[1:]) - flower_round
    startup = ends[0] - flower_rounds[0] - t0  # Ray start, actors, partition-id discovery
    warmup = flower_rounds[0] - flower_round
    teardown = t0 + flower_wall - ends[-1]  # Ray and Flower shutdown, final files
    s = cfg.strategy
    work = f"{s.local_steps} steps" if s.local_steps else f"{s.local_epochs} epoch"
    clients = cfg.partition.num_clients
    print(f"workload: {cfg.name}, {clients} clients x {work}, {samples} examples a round, {cores} cores")
    print(f"{'path':<26}{'s / round':>10}{'samples/s':>11}")
    for name, t in (
        ("flower (fedmem)", flower_round),
        ("bare in-process loop", bare_in_round),
        (f"bare {cores}-process pool", bare_pool_round),
    ):
        print(f"{name:<26}{t:>10.2f}{samples / t:>11.0f}")
    print(f"flower rounds (s): {' '.join(f'{t:.2f}' for t in flower_rounds)}")
    target = 1.10 if cfg.data.dataset == "stdlib_text" else 1.15
    print(f"ratio flower / bare in-process: {flower_round / bare_in_round:.3f}  (target <= {target})")
    print(f"ratio flower / bare pool:       {flower_round / bare_pool_round:.3f}")
    print(f"fixed start-up + shutdown: {fixed:.1f} s  (target <= 10 s; wall {flower_wall:.1f} s)")
    print(
        f"  = start-up {startup:.1f} s (Ray, actors, discovery) + first-round warm-up {warmup:.1f} s"
        f" + teardown {teardown:.1f} s"
    )


if __name__ == "__main__":
    main()
