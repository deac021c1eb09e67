"""Fixed cost of one Flower run (start-up and teardown), piece by piece: before vs after.

Every sample runs in a fresh interpreter (``python benchmarks/startup.py --child KIND``),
so imports are paid as a real ``fedmem run`` pays them; the variants of a part are
interleaved within each repeat and the table shows medians (min-max), so a ratio comes
from samples taken side by side. Parts:

``imports``
    ``import torch``; then ``import flwr.simulation`` (+ serverapp, clientapp).
``data``
    Fashion-MNIST: idx decode (``FEDMEM_DATA_CACHE=off``) vs the ``.npy`` cache (warm).
``ray``
    Ray alone: ``ray.init`` as Flower's backend calls it (with its ``runtime_env``) vs
    :func:`fedmem.federation.ray_start.start_ray` (lean, preloading the ClientApp's
    modules); then two actors' first call (importing the ClientApp module, as an actor
    unpickling fedmem's ClientApp does); then teardown until no Ray process is left:
    ``ray.shutdown()`` (``flower-init``, ``start_ray+shutdown``) or ``stop_ray()``.
``flower``
    The whole fixed cost of a run, from interpreter start to exit, with a stand-in
    ServerApp (waits for all nodes, sends every node one message; each client answers
    after importing fedmem's ClientApp module and building its data with
    ``client_data``: an actor's first-message work short of training), on the default
    scenario with ``data.max_samples=2000``. Variants: ``before`` (Ray started by Flower
    inside ``run_simulation``, idx decode), ``after`` (``start_ray`` first thing, lean,
    with preload, ``.npy`` cache), ``after-late`` (the same, but ``start_ray`` called only
    after torch and fedmem are imported, where a runner sits), ``after-nopreload``,
    ``after-exit`` (``after`` ending with ``os._exit(0)``: no interpreter finalization).
``e2e`` (only with ``--e2e``)
    ``fedmem run default --set rounds=1 --set data.max_samples=2000`` wall time, data cache
    off vs on: whatever the runner currently does.

Rows ``cpu`` (CPU seconds of the sample's process tree, Ray's processes sampled every
0.1 s), ``others cpu`` (CPU seconds the rest of the machine spent meanwhile: system busy
time minus ``cpu``) and ``others before`` (busy cores just before the sample) tell whether
a sample competed with other load; ``--settle`` waits for an idle machine first.

Usage: ``python benchmarks/startup.py [--repeats 3] [--parts imports,data,ray,flower] [--e2e]
[--settle 60] [--pause-niceness 19]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

T_START = time.time()  # this interpreter's first line, for the interpreter start-up of a child

# What actors import on their first message: fedmem's ClientApp module, and Flower's actor class.
PRELOAD = ("fedmem.federation.client_app", "flwr.simulation.ray_transport.ray_actor")
FLOWER_CONFIG = ["rounds=1", "data.max_samples=2000"]
NUM_CPUS = 2


def _init_args(temp_dir: str) -> dict[str, Any]:
    # As fedmem's runner builds them (backend_config) when not verbose.
    return {
        "num_cpus": NUM_CPUS,
        "_temp_dir": temp_dir,
        "include_dashboard": False,
        "logging_level": 40,
        "log_to_driver": False,
    }


def _quiet_env() -> None:
    for key, value in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "RAY_DEDUP_LOGS": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        os.environ.setdefault(key, value)


def _stat(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


class Clock:
    """Marks in seconds since this interpreter's first line; CPU of this process tree."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"python": T_START - float(os.environ.get("STARTUP_SPAWNED", T_START))}
        self._cpu: dict[tuple[int, str], int] = {}  # (pid, start time) -> most CPU ticks seen
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        # Ray's processes are reaped by no one here (or die with the raylet): their CPU never
        # reaches this process's rusage, so it is sampled while they live.
        while True:
            for pid, start in _descendants().items():
                if (fields := _stat(pid)) is not None and fields[19] == start:
                    key = (pid, start)
                    self._cpu[key] = max(self._cpu.get(key, 0), int(fields[11]) + int(fields[12]))
            time.sleep(0.1)

    def cpu(self) -> float:
        """CPU seconds of this process and (as last sampled) its descendants."""
        own = os.times()
        return own.user + own.system + sum(self._cpu.values()) / os.sysconf("SC_CLK_TCK")

    def mark(self, name: str) -> None:
        self.marks[name] = time.time() - T_START

    def result(self) -> dict[str, float]:
        return {**self.marks, "cpu": self.cpu()}

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.time()
        yield
        self.marks[name] = time.time() - start


# --------------------------------------------------------------------------- children


def child_imports(variant: str) -> dict[str, float]:
    clock = Clock()
    with clock.span("import torch"):
        import torch  # noqa: F401
    with clock.span("import flwr"):
        import flwr.clientapp
        import flwr.serverapp
        import flwr.simulation  # noqa: F401
    return clock.result()


def child_data(variant: str) -> dict[str, float]:
    if variant == "decode":
        os.environ["FEDMEM_DATA_CACHE"] = "off"
    import torch  # noqa: F401 (imported by the data module anyway; not what is timed)

    from fedmem.data.datasets import load_images

    clock = Clock()
    with clock.span("load"):
        data = load_images("fashion_mnist", "data", download=False)
        int(data.x[::97].sum())  # touch pages across the array, as a partition would
    return clock.result()


def _ray_processes_left(pids: dict[int, str]) -> int:
    left = 0
    for pid, start in pids.items():
        if (fields := _stat(pid)) is not None:
            left += fields[0] != "Z" and fields[19] == start
    return left


def _descendants() -> dict[int, str]:
    """This process's descendants (pid -> start time)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(entry)) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found: dict[int, str] = {}
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        found[pid] = starts.get(pid, "")
        todo.extend(children.get(pid, []))
    return found


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # gone, or not ours to read
        pass
    return 0


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    name = os.path.basename(words[0].decode(errors="replace"))
    if name.startswith("python") and len(words) > 1:  # Ray workers set their title in argv[0]
        return os.path.basename(words[1].decode(errors="replace"))
    return name


class PeakMemory:
    """Largest PSS sum of this process tree (shared pages counted once), sampled in a background
    thread every ``interval`` seconds while inside ``with``; ``peak`` in bytes.

    ``at_peak`` holds (process name, bytes) of every process at the sample that set the peak.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self.at_peak: list[tuple[str, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            sizes = [(_name(p), _pss_bytes(p)) for p in (os.getpid(), *_descendants())]
            if (total := sum(b for _, b in sizes)) > self.peak:
                self.peak, self.at_peak = total, sorted(sizes, key=lambda x: -x[1])
            self._done.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def child_ray(variant: str) -> dict[str, float]:
    _quiet_env()
    import ray

    clock = Clock()
    temp_dir = tempfile.mkdtemp(prefix="fedmem-bench-")
    args = _init_args(temp_dir)
    with clock.span("ray up"):
        if variant == "flower-init":
            pythonpath = os.pathsep.join(sys.path)
            os.environ["PYTHONPATH"] = pythonpath
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
        else:
            from fedmem.federation.ray_start import start_ray

            start_ray(args, preload=PRELOAD, threads_per_worker=1).wait()

    @ray.remote(num_cpus=1)
    class Actor:
        def first_call(self) -> int:
            import fedmem.federation.client_app  # noqa: F401 (what unpickling the ClientApp imports)

            return os.getpid()

    with clock.span("actors' first call"):
        actors = [Actor.remote() for _ in range(NUM_CPUS)]  # type: ignore[attr-defined]
        ray.get([a.first_call.remote() for a in actors])
    tree = _descendants()
    with clock.span("teardown"):
        if variant in ("flower-init", "start_ray+shutdown"):
            ray.shutdown()
            while _ray_processes_left(tree):  # its workers exit in their own time
                time.sleep(0.02)
        else:
            from fedmem.federation.ray_start import stop_ray

            stop_ray()
    clock.marks["left"] = _ray_processes_left(tree)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return clock.result()


def child_flower(variant: str) -> dict[str, float]:
    _quiet_env()
    clock = Clock()
    after = variant.startswith("after")
    if not after:
        os.environ["FEDMEM_DATA_CACHE"] = "off"
    temp_dir = tempfile.mkdtemp(prefix="fedmem-bench-")
    os.environ.setdefault("FLWR_HOME", os.path.join(temp_dir, "flwr"))
    init_args = _init_args(temp_dir)
    preload = () if variant == "after-nopreload" else PRELOAD
    handle = None
    if after and variant != "after-late":
        from fedmem.federation.ray_start import start_ray

        handle = start_ray(init_args, preload=preload, threads_per_worker=1)
        clock.mark("start_ray returned")
    import torch  # noqa: F401

    from fedmem.config import load_config
    from fedmem.federated_data import federation

    clock.mark("torch+fedmem imported")
    if variant == "after-late":
        from fedmem.federation.ray_start import start_ray

        handle = start_ray(init_args, preload=preload, threads_per_worker=1)
    cfg = load_config("default", FLOWER_CONFIG)
    federation(cfg)  # the runner's preflight: data loaded and partitioned
    clock.mark("data loaded")
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    clock.mark("flwr imported")
    if handle is not None:
        handle.wait()
        clock.mark("ray ready")
    config_json = cfg.to_json()
    n = cfg.partition.num_clients

    client = ClientApp()

    @client.query()
    def first_message(msg: Message, context: Any) -> Message:
        entered = time.time() - T_START  # T_START: the driver's, shipped with this function
        import fedmem.federation.client_app  # noqa: F401 (what unpickling fedmem's ClientApp imports)
        from fedmem.client import parse_config
        from fedmem.federated_data import client_data

        pid = int(context.node_config["partition-id"])
        client_data(parse_config(config_json), pid)
        times = MetricRecord({"entered": entered, "done": time.time() - T_START})
        return Message(RecordDict({"m": times}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Any) -> None:
        clock.mark("server main")
        while len(node_ids := list(grid.get_node_ids())) < n:
            time.sleep(0.02)
        clock.mark("nodes seen")
        messages = [
            Message(RecordDict({"m": MetricRecord({"x": 1})}), dst_node_id=i, message_type="query")
            for i in node_ids
        ]
        waiting = set(grid.push_messages(messages))
        while waiting:
            got = list(grid.pull_messages(waiting))
            if got and "first reply" not in clock.marks:
                clock.mark("first reply")
                times = got[0].content.metric_records["m"]
                clock.marks["(its handler entered)"] = cast(float, times["entered"])
                clock.marks["(its handler done)"] = cast(float, times["done"])
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if waiting:
                time.sleep(0.02)
        clock.mark("all replies")

    import logging
    import warnings

    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    clock.mark("run_simulation called")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server,
            client_app=client,
            num_supernodes=n,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": init_args,
            },
        )
    clock.mark("run_simulation returned")
    if after:
        from fedmem.federation.ray_start import stop_ray

        stop_ray()
        clock.mark("stop_ray returned")
    shutil.rmtree(temp_dir, ignore_errors=True)
    return clock.result()


CHILDREN: dict[str, Callable[[str], dict[str, float]]] = {
    "imports": child_imports,
    "data": child_data,
    "ray": child_ray,
    "flower": child_flower,
}
VARIANTS = {
    "imports": ["fresh"],
    "data": ["decode", "npy"],
    "ray": ["flower-init", "start_ray+shutdown", "start_ray"],
    "flower": ["before", "after", "after-late", "after-nopreload", "after-exit"],
    "e2e": ["cache-off", "cache-on"],
}


# --------------------------------------------------------------------------- parent


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


@contextmanager
def _paused(niceness: int | None) -> Iterator[None]:
    """SIGSTOP other user processes running at ``niceness`` (a background job), SIGCONT after."""
    if niceness is None:
        yield
        return
    mine = {os.getpid()}
    stopped = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if (
                int(fields[16]) == niceness and Path(f"/proc/{entry}/cmdline").read_bytes()
            ):  # no kernel threads
                os.kill(int(entry), signal.SIGSTOP)
                stopped.append(int(entry))
        except (OSError, ValueError):
            continue
    try:
        yield
    finally:
        for pid in stopped:
            with suppress(OSError):
                os.kill(pid, signal.SIGCONT)


def _others_load(seconds: float = 1.0) -> float:
    """Busy CPUs (cores) over ``seconds`` while this benchmark runs nothing."""
    busy0 = _busy_jiffies()
    time.sleep(seconds)
    return (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK") / seconds


def run_child(part: str, variant: str, pause: int | None, settle: float) -> dict[str, float]:
    with _paused(pause):
        deadline = time.time() + settle
        load = _others_load()
        while load > 0.25 and time.time() < deadline:
            load = _others_load()
        return _run_child(part, variant, load)


def _run_child(part: str, variant: str, load_before: float) -> dict[str, float]:
    env = {**os.environ, "STARTUP_SPAWNED": repr(time.time())}
    if part == "e2e":
        command = ["fedmem", "run", "default", *(f"--set={o}" for o in FLOWER_CONFIG)]
        if variant == "cache-off":
            env["FEDMEM_DATA_CACHE"] = "off"
    else:
        command = [sys.executable, __file__, "--child", part, variant]
    with tempfile.TemporaryDirectory() as out:
        if part == "e2e":
            command += ["--out", out]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, start = _busy_jiffies(), time.time()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        wall = time.time() - start
        busy = (_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Reaped descendants only: Ray's processes are missing unless the child sampled them.
    ours = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    marks: dict[str, float] = {}
    if part != "e2e":
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{part}/{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        marks = json.loads(lines[-1][len("RESULT ") :])
    elif done.returncode != 0:
        print(f"  (fedmem run exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]})")
    marks["wall"] = wall
    marks["cpu"] = max(ours, marks.get("cpu", 0.0))
    marks["others cpu"] = max(0.0, busy - marks["cpu"])
    marks["others before"] = load_before
    return marks


def _fmt(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:6.2f}"
    return f"{med:6.2f} ({min(values):.2f}-{max(values):.2f})"


def report(part: str, samples: dict[str, list[dict[str, float]]]) -> None:
    variants = list(samples)
    keys: list[str] = []
    for variant in variants:
        for sample in samples[variant]:
            keys.extend(k for k in sample if k not in keys)
    width = max(len(k) for k in keys) + 2
    print(f"\n== {part} (seconds; median (min-max) of {len(samples[variants[0]])})")
    print(" " * width + "".join(f"{v:>22}" for v in variants))
    for key in keys:
        cells = []
        for variant in variants:
            values = [s[key] for s in samples[variant] if key in s]
            cells.append(f"{_fmt(values):>22}" if values else f"{'-':>22}")
        print(f"{key:<{width}}" + "".join(cells))
    if len(variants) > 1:
        base = statistics.median(s["wall"] for s in samples[variants[0]])
        ratios = ", ".join(
            f"{v}: {statistics.median(s['wall'] for s in samples[v]) / base:.2f}" for v in variants[1:]
        )
        print(f"wall relative to {variants[0]}: {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, metavar=("PART", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="imports,data,ray,flower")
    parser.add_argument("--e2e", action="store_true", help="also time `fedmem run` end to end")
    parser.add_argument(
        "--pause-niceness",
        type=int,
        metavar="N",
        help="SIGSTOP other processes at niceness N (a background job) during each sample; SIGCONT after",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="S",
        help="before each sample, wait up to S seconds for the machine to be idle (< 0.25 busy cores)",
    )
    args = parser.parse_args()
    if args.child:
        part, variant = args.child
        print("RESULT " + json.dumps(CHILDREN[part](variant)), flush=True)
        if variant == "after-exit":
            sys.stderr.flush()
            os._exit(0)  # skip the interpreter's finalization (torch, flwr, Ray modules)
        return

    parts = [p for p in args.parts.split(",") if p] + (["e2e"] if args.e2e else [])
    print(
        f"{os.cpu_count()} CPUs; {args.repeats} repeats; background paused: {args.pause_niceness is not None}"
    )
    # Warm the .npy cache (and the page cache) so that "npy" / "after" measure a warm start.
    run_child("data", "npy", None, 0.0)
    for part in parts:
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS[part]}
        for _ in range(args.repeats):
            for variant in VARIANTS[part]:
                samples[variant].append(run_child(part, variant, args.pause_niceness, args.settle))
        report(part, samples)


if __name__ == "__main__":
    main()
