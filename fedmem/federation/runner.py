"""Host federations on Flower's Ray simulation engine, in this process: one warm session for many.

``flwr.simulation.run_simulation`` is the fastest launch on one machine (DESIGN.md §3). It
runs the ServerApp in a thread and the client runtime in the calling thread, and returns
nothing; the ServerApp built here runs the whole ``body`` (every federation of a sweep) over
one Grid, so Ray, the actors (torch imported, data loaded) and node discovery are paid once.

Interruption: while the session runs, Ctrl-C only sets a stop event. The executors' reply
waits poll it, so the ServerApp thread ends within a poll interval, marking the running
federation ``interrupted``; Flower then stops its runtime and Ray, and KeyboardInterrupt is
raised again here. A second Ctrl-C interrupts at once. Everything Flower-version-specific
about launching lives in this file.

Cluster: with ``runtime.ray_address`` (or ``RAY_ADDRESS`` when the key is empty) the session
joins that Ray cluster instead of starting Ray here. Flower sizes its actor pool from the
cluster's nodes, Ray places the actors, and every node that can host one is checked first
(:mod:`fedmem.federation.cluster`); at the end this process only disconnects.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmem.config import Config, RuntimeConfig, check_ray_address
from fedmem.errors import FederationError
from fedmem.federation.ray_start import JOIN_SECONDS, RayStart, start_ray, stop_ray
from fedmem.federation.stop import Stop

if TYPE_CHECKING:  # kept light: the CLI imports this module before torch to start Ray early
    from fedmem.simulation import Body

# Read by Flower at import time; Ray's own variables are ray_start.RAY_ENV.
_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


# Imported by every Ray worker as it starts (Ray's preload_python_modules): the actors Flower
# creates find torch, flwr, the engine and the strategies imported, not 2-3 s of imports ahead.
PRELOAD = ("fedmem.federation.client_app", "strategies", "flwr.simulation.ray_transport.ray_actor")


#: The environment variable Ray reads for a cluster's address; used when runtime.ray_address is "".
RAY_ADDRESS_ENV = "RAY_ADDRESS"


def ray_address(runtime: RuntimeConfig) -> str:
    """The Ray cluster to join: ``runtime.ray_address``, else ``$RAY_ADDRESS``; "" starts a local Ray.

    Raises
    ------
    ConfigError
        If ``$RAY_ADDRESS`` is used and is not a form fedmem can join (the key itself is
        checked with the rest of the config).
    """
    if runtime.ray_address:
        return runtime.ray_address
    address = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    check_ray_address(address, f"the environment variable {RAY_ADDRESS_ENV}")
    return address


def backend_config(cfg: Config, temp_dir: str, verbose: bool) -> dict[str, Any]:
    """Ray backend settings: one actor per ``runtime.cpus_per_client`` CPUs, no GPU, quiet unless verbose.

    On a cluster (:func:`ray_address`) ``init_args`` only say where to connect and how loud
    to be: the CPUs are the nodes' own, and the temp dir is each node's business.
    """
    address = ray_address(cfg.runtime)
    init_args: dict[str, Any]
    if address:
        init_args = {"address": address}
    else:
        num_cpus = cfg.runtime.num_cpus or os.cpu_count() or 1
        init_args = {"num_cpus": num_cpus, "_temp_dir": temp_dir, "include_dashboard": False}
    if not verbose:
        init_args.update({"logging_level": logging.ERROR, "log_to_driver": False})
    return {
        "client_resources": {"num_cpus": cfg.runtime.cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


@contextmanager
def _stop_on_ctrl_c(stop: Stop) -> Iterator[None]:
    """While inside, the first SIGINT sets ``stop``; a second one raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set(Stop.USER)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass
class _Ray:
    """A Ray start for a session: the handle, its temp dir, and what it was started for."""

    start: RayStart
    temp_dir: str  # Ray's (a local start) and Flower's home
    runtime: RuntimeConfig
    verbose: bool
    address: str  # the cluster joined; "" for a local Ray


_early: _Ray | None = None


def _start(cfg: Config, verbose: bool) -> _Ray:
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    # Ray's unix socket paths must stay under ~107 bytes, so its temp dir cannot live deep inside the run dir.
    temp_dir = tempfile.mkdtemp(prefix="fedmem-ray-")
    address = ray_address(cfg.runtime)
    init_args = backend_config(cfg, temp_dir, verbose)["init_args"]
    if address:  # the cluster's workers are already running: nothing to preload into them
        handle = start_ray(init_args, lean=False)
    else:
        handle = start_ray(init_args, preload=PRELOAD, threads_per_worker=cfg.runtime.cpus_per_client)
    return _Ray(handle, temp_dir, cfg.runtime, verbose, address)


def prestart(cfg: Config, verbose: bool = False) -> None:
    """Start Ray now, in a background thread, for the Flower session that will follow.

    The CLI calls this as soon as the config is read, so that Ray's start (2-4 s) overlaps
    importing torch, loading the data and the preflight. A session with other runtime
    settings starts its own Ray instead; one that never comes leaves nothing behind (exit hook).
    """
    global _early
    if cfg.runtime.engine == "flower" and _early is None:
        _early = _start(cfg, verbose)
        atexit.register(abandon)


def abandon() -> None:
    """Stop a Ray that :func:`prestart` started for a session that never came; remove its temp dir."""
    global _early
    if _early is not None:
        stop_ray()
        shutil.rmtree(_early.temp_dir, ignore_errors=True)
        _early = None


def _ray_for(cfg: Config, verbose: bool) -> _Ray:
    global _early
    early, _early = _early, None
    if (
        early is not None
        and early.runtime == cfg.runtime
        and early.verbose == verbose
        and early.address == ray_address(cfg.runtime)
    ):
        return early
    if early is not None:
        stop_ray()
        shutil.rmtree(early.temp_dir, ignore_errors=True)
    return _start(cfg, verbose)


def flower_session(
    cfg: Config, num_nodes: int, body: Body, *, verbose: bool = False, client_app: Any = None
) -> None:
    """Run ``body`` in one Flower simulation with ``num_nodes`` supernodes (partition ids 0..n-1).

    ``client_app`` replaces fedmem's ClientApp (tests use it to make clients crash). On a
    cluster, every node that can host a client is checked before the first round
    (:func:`fedmem.federation.cluster.check_cluster`); a node that lacks something ends the
    session with one sentence naming it.
    """
    ray_ = _ray_for(cfg, verbose)
    temp_dir = ray_.temp_dir
    # Per session, not setdefault: a second session in this process must not write into the
    # first one's deleted directory (Flower would create it again and leave it behind).
    old_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = os.path.join(temp_dir, "flwr")

    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmem.federation.client_app import app as fedmem_client_app
    from fedmem.federation.ray_backend import replacing_dead_actors
    from fedmem.federation.server_app import FlowerExecutor, discover, supernodes

    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.CRITICAL)
    nodes = supernodes(cfg, num_nodes)  # each node serves several clients (see server_app)
    stop = Stop()
    done = threading.Event()
    outcome: dict[str, BaseException] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Any) -> None:
        try:
            node_of = discover(grid, nodes, stop)
            body(lambda c: FlowerExecutor(grid, c, node_of, stop))
        except BaseException as exc:  # kept for the caller: Flower would wrap or log it
            outcome["error"] = exc
        finally:
            done.set()

    crash: Exception | None = None
    try:
        with warnings.catch_warnings(), _stop_on_ctrl_c(stop), replacing_dead_actors():
            if not verbose:
                warnings.simplefilter("ignore")
            # Flower's backend calls ray.init only when Ray is not running yet
            ray_.start.wait(JOIN_SECONDS if ray_.address else None)
            if ray_.address:
                from fedmem.federation.cluster import check_cluster

                # Node count from the cluster's actors, not this machine's CPUs: none may sit idle.
                nodes = supernodes(cfg, num_nodes, actors=check_cluster(cfg, interrupted=stop.is_set))
            run_simulation(
                server_app=server_app,
                client_app=client_app or fedmem_client_app,
                num_supernodes=nodes,
                backend_config=backend_config(cfg, temp_dir, verbose),
                verbose_logging=verbose,
            )
    except FederationError:  # Ray could not start, or a cluster node lacks something: its own sentence
        raise
    except Exception as exc:  # Flower's "Ending simulation": its cause is what the user needs
        crash = exc
    finally:
        # The client runtime may have ended first (a Ray process died): release the ServerApp thread.
        stop.set(Stop.RUNTIME)
        done.wait(timeout=10.0)
        flwr_logger.setLevel(old_level)
        stop_ray()
        if old_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old_home
        shutil.rmtree(temp_dir, ignore_errors=True)
    if "error" in outcome:
        raise outcome["error"]
    if not done.is_set() or crash is not None:
        cause = crash.__cause__ or crash if crash is not None else None
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else " (use --verbose)"
        raise FederationError(f"Flower's simulation runtime stopped before the federations ended{detail}")
