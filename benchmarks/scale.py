"""Cross-device scale: per-client overhead of the Flower path with thousands of clients per round.

Workload: Fashion-MNIST split IID over N clients (none held out), EVERY client trains every
round (``strategy.fraction_fit = 1``), 1 local epoch of the 114k-parameter CNN, and all clients
evaluate after the last round (the scenario's personalizers unless ``--personalizers``). The run
goes through ``fedmem``'s Flower engine (``runtime.engine = "flower"``), exactly as ``fedmem run``.

For each round the script prints the wall time of the executor's train call (driver push to last
reply read) and the bare compute of the same clients: ``fedmem.client.train_client`` (then
``evaluate_client``) called in this process, one torch thread as in an actor, no transport; its
per-client mean over ``--bare-clients`` seeded clients times N, divided by the number of actors
(the ideal parallel time of that work). Per-client overhead = (round time - bare compute) / N.
The same in CPU seconds (this process tree's CPU during the call, against the bare loop's CPU
times N): on a machine shared with other jobs, wall times move with their load, CPU much less.
Peak memory is the largest sum of PSS (proportional set size: shared pages counted once) over
this process and all its descendants (Ray's GCS, raylet, object store and actors), sampled
every 0.5 s.

Targets (reliability issue, part 3): <= 10 ms overhead per client per round on 2 cores;
<= 8 GiB at 5,000 clients.

Usage: ``python benchmarks/scale.py [--clients 1000,5000] [--rounds 3] [--bare-clients 300]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from startup import PeakMemory, _descendants, _stat  # this directory is on sys.path when run as a script

from fedmem.client import evaluate_client, federation, get_strategy, initial_weights, train_client
from fedmem.config import Config, load_config
from fedmem.federation.sessions import run_on_engine
from fedmem.simulation import Body, Executor, ExecutorFactory, server_context
from fedmem.updates import Arrays

Call = tuple[str, int, int, float, float]  # (train | evaluate, round, clients, seconds, CPU seconds)


def tree_cpu() -> float:
    """CPU seconds used so far by this process and its living descendants (Ray and its actors)."""
    own = os.times()
    ticks = 0
    for pid in _descendants():
        if (fields := _stat(pid)) is not None:
            ticks += int(fields[11]) + int(fields[12])
    return own.user + own.system + ticks / os.sysconf("SC_CLK_TCK")


class Timed:
    """An executor that records the wall time of every call of the one it wraps."""

    def __init__(self, inner: Executor, calls: list[Call]) -> None:
        self.inner, self.calls = inner, calls

    def _timed(self, kind: str, server_round: int, pids: Sequence[int], arrays: Arrays) -> Any:
        cpu, start = tree_cpu(), time.perf_counter()
        out = getattr(self.inner, kind)(server_round, pids, arrays)
        self.calls.append((kind, server_round, len(pids), time.perf_counter() - start, tree_cpu() - cpu))
        return out

    def train(self, server_round: int, pids: Sequence[int], arrays: Arrays) -> Any:
        return self._timed("train", server_round, pids, arrays)

    def evaluate(self, server_round: int, pids: Sequence[int], arrays: Arrays) -> Any:
        return self._timed("evaluate", server_round, pids, arrays)

    def score(self, server_round: int, pids: Sequence[int], arrays: Arrays) -> Any:
        return self._timed("score", server_round, pids, arrays)


def timed_flower_session(calls: list[Call]) -> Callable[[Config, int, Body], None]:
    """Flower's session, every federation's executor wrapped in :class:`Timed`."""
    from fedmem.federation.runner import flower_session

    def session(cfg: Config, num_nodes: int, body: Body) -> None:
        def timed_body(make: ExecutorFactory) -> None:
            body(lambda c: Timed(make(c), calls))

        flower_session(cfg, num_nodes, timed_body)

    return session


def bare_per_client(cfg: Config, pids: Sequence[int]) -> dict[str, tuple[float, float]]:
    """Mean (wall, CPU) seconds per client of ``train_client`` and ``evaluate_client``, here, 1 thread."""
    torch.set_num_threads(cfg.runtime.cpus_per_client)
    strategy = get_strategy(cfg)
    sent = strategy.broadcast(strategy.init(initial_weights(cfg), server_context(cfg)), 1)
    times: dict[str, tuple[float, float]] = {}
    for name, fn in (("train", train_client), ("evaluate", evaluate_client)):
        fn(cfg, pids[0], 1, sent)  # first call: kernels, caches
        cpu, start = time.process_time(), time.perf_counter()
        for pid in pids:
            fn(cfg, pid, 1, sent)
        n = len(pids)
        times[name] = ((time.perf_counter() - start) / n, (time.process_time() - cpu) / n)
    return times


def measure(args: argparse.Namespace, clients: int, tmp: str) -> None:
    overrides = [
        f"rounds={args.rounds}",
        f"eval_every={args.rounds}",
        "partition.scheme='iid'",
        f"partition.num_clients={clients}",
        "partition.unseen_fraction=0.0",
        "strategy.fraction_fit=1.0",
        f"runtime.output_dir='{tmp}/runs'",
        "runtime.engine='flower'",
    ]
    if args.personalizers is not None:
        names = ", ".join(f"'{n}'" for n in args.personalizers.split(",") if n)
        overrides.append(f"eval.personalizers=[{names}]")
    cfg = load_config(args.scenario, overrides)
    fed = federation(cfg)  # data load and partition outside every timing
    actors = (cfg.runtime.num_cpus or os.cpu_count() or 1) // cfg.runtime.cpus_per_client
    examples = sum(len(c.train) for c in fed.clients)

    calls: list[Call] = []
    start = time.perf_counter()
    with PeakMemory() as memory:
        run_on_engine(cfg, session=timed_flower_session(calls))
    wall = time.perf_counter() - start

    sample = np.sort(np.random.default_rng(0).choice(clients, min(args.bare_clients, clients), replace=False))
    bare_cfg = cfg.with_runtime(run_dir=f"{tmp}/bare")
    per_client = bare_per_client(bare_cfg, [int(p) for p in sample])

    print(
        f"\n{clients} clients, {actors} actors x {cfg.runtime.cpus_per_client} thread, "
        f"{examples} training examples a round ({examples / clients:.0f} a client); "
        f"bare compute from {len(sample)} clients"
    )
    print(
        f"{'call':<12}{'clients':>8}{'seconds':>9}{'bare s':>8}{'overhead':>10}"
        f"{'CPU s':>9}{'bare CPU s':>11}{'CPU overhead':>14}"
    )
    print(f"{'':<12}{'':>8}{'':>9}{'':>8}{'ms/client':>10}{'':>9}{'':>11}{'ms/client':>14}")
    overheads: dict[str, list[tuple[float, float]]] = {"train": [], "evaluate": []}
    for kind, server_round, n, seconds, cpu in calls:
        wall_1, cpu_1 = per_client[kind]
        bare, bare_cpu = wall_1 * n / actors, cpu_1 * n  # wall: the ideal parallel time of the work
        ms, cpu_ms = 1000 * (seconds - bare) / n, 1000 * (cpu - bare_cpu) / n
        overheads[kind].append((ms, cpu_ms))
        label = f"{kind} r{server_round}"
        print(
            f"{label:<12}{n:>8}{seconds:>9.1f}{bare:>8.1f}{ms:>10.1f}{cpu:>9.1f}{bare_cpu:>11.1f}{cpu_ms:>14.1f}"
        )
    steady = overheads["train"][1:] or overheads["train"]  # round 1 also warms the actors up
    print(
        f"train overhead, rounds 2..: median {statistics.median(o[0] for o in steady):.1f} ms / client "
        f"(target <= 10), CPU {statistics.median(o[1] for o in steady):.1f} ms / client"
    )
    ev_wall, ev_cpu = overheads["evaluate"][-1]
    print(f"evaluate overhead: {ev_wall:.1f} ms / client, CPU {ev_cpu:.1f} ms / client")
    print(
        f"peak memory (PSS, driver + Ray + actors): {memory.peak / 2**30:.2f} GiB"
        + ("  (target <= 8 GiB)" if clients >= 5000 else "")
    )
    top = ", ".join(f"{name[:24]} {b / 2**30:.2f}" for name, b in memory.at_peak[:5])
    print(f"  at the peak, GiB: {top}")
    print(f"wall time of the run (Ray start to shutdown): {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="default", help="a scenario name or path")
    parser.add_argument("--clients", default="1000,5000", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare-clients", type=int, default=300, help="clients timed for the bare compute")
    parser.add_argument(
        "--personalizers", default=None, help="comma-separated eval.personalizers (default: the scenario's)"
    )
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    for clients in (int(c) for c in args.clients.split(",")):
        with tempfile.TemporaryDirectory(prefix="fedmem-scale-") as tmp:
            measure(args, clients, tmp)


if __name__ == "__main__":
    main()
