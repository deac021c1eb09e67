"""Start Ray early, in a background thread, and stop it fast: the fixed cost of a Flower run.

Flower's Ray backend calls ``ray.init`` only if Ray is not initialised yet, so fedmem
starts Ray itself: :func:`start_ray` runs ``ray.init`` in a background thread and returns
at once, the caller imports flwr, loads the data and checks the config meanwhile,
:meth:`RayStart.wait` blocks until Ray is up (call it before ``run_simulation``), and
:func:`stop_ray` shuts Ray down and ends whatever is left of it. The thread that called
``ray.init`` must outlive the driver's use of Ray (Ray 2.55: once it has exited, the
driver's next call to the GCS hangs), so it parks until :func:`stop_ray`.

*Lean start* (:data:`LEAN_RAY_VERSIONS` only, otherwise plain ``ray.init``): while
``ray.init`` runs, four of Ray's private start-up steps that a one-machine simulation does
not use are replaced: the autoscaler monitor and the dashboard API server are not started
(Ray's job and state APIs are unavailable without the latter), nor the log monitor when
``log_to_driver`` is false, and the raylet's registration is polled in the GCS every 20 ms
instead of by Ray's once-a-second retry. A job-level ``runtime_env`` is avoided (it keeps
actors off the prestarted workers): :func:`start_ray` exports ``PYTHONPATH`` to Ray's
processes through the environment instead.

*Preload*: every Ray worker imports the modules named in ``preload`` as it starts (Ray's
``preload_python_modules``), so the prestarted workers that become Flower's actors import
torch, flwr and fedmem before the first message. Because torch reads ``OMP_NUM_THREADS``
when imported, before Ray sets it for an actor, ``threads_per_worker`` sets it for the
workers first.

*Teardown*: ``ray.shutdown()`` terminates the raylet, the GCS and the other head processes;
workers ending gracefully would spend about a second each finalizing their interpreter, so
:func:`stop_ray` kills them once Ray is shut down.

What each step saves, and what was measured not to help, is in docs/benchmarks.md
("Ray's start and stop").

*Joining a cluster*: with ``address`` in ``init_args`` (``"auto"`` or ``"HOST:PORT"``),
:func:`start_ray` connects this process to a Ray cluster that others started and own:
neither the lean start nor ``preload`` applies (they shape processes this process would
start), and :func:`stop_ray` only disconnects. The kill step is for processes this
process started; on a cluster it would hit the cluster's own raylet and workers.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from fedmem.errors import FederationError

logger = logging.getLogger(__name__)

#: Ray versions whose private start-up steps the lean start replaces (flwr 1.41 pins 2.55.1).
LEAN_RAY_VERSIONS: tuple[str, ...] = ("2.55.",)

#: Set (if unset) before ``ray.init``: no usage stats, no accelerator-env warning, whole logs,
#: workers at nice 0.
RAY_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    # Ray starts workers at nice 15: on a machine shared with anything else the clients, which
    # are the simulation's whole compute, would lose the CPU to it. They are the foreground job.
    "RAY_worker_niceness": "0",
}

# Modules that ray.init imports lazily and that flwr / fedmem import too: imported here, in
# the caller's thread, so that the two threads never import the same package at once.
_SHARED_LAZY_IMPORTS = ("click", "pydantic", "colorsys")

# Read by Ray workers that preload this module (see start_ray's threads_per_worker).
_THREADS_ENV = "FEDMEM_RAY_WORKER_THREADS"

_POLL_SECONDS = 0.02  # how often the lean start asks the GCS whether the raylet registered
_RAYLET_WAIT_SECONDS = 30.0  # Ray's own limit for the raylet to register (raylet_start_wait_time_s)

#: Seconds to wait for a cluster's head to answer. Without a limit, ray.init retried an address
#: where nothing listens for more than 5 minutes (measured, Ray 2.55).
JOIN_SECONDS = 60.0
_PROBE_SECONDS = 5.0  # a first TCP connection to the head: a wrong address fails in seconds


def _configure_worker() -> None:
    """In a Ray worker preloading this module first: fix OMP_NUM_THREADS before torch is imported.

    Ray sets OMP_NUM_THREADS to an actor's CPUs only when the actor starts, but torch reads
    it at import: a worker that preloaded torch would keep torch's default (all cores).
    """
    threads = os.environ.get(_THREADS_ENV)
    if threads and "RAY_RAYLET_PID" in os.environ:  # only in Ray's workers, never in the driver
        os.environ.setdefault("OMP_NUM_THREADS", threads)


_configure_worker()


@dataclass
class RayStart:
    """A ``ray.init`` running (or done) in a background thread; see :func:`start_ray`.

    Attributes
    ----------
    init_args:
        The arguments ``ray.init`` was called with.
    lean:
        Whether the lean start (module docstring) was used.
    seconds:
        How long ``ray.init`` took, once it has returned (None before).
    """

    init_args: dict[str, Any]
    lean: bool
    seconds: float | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)
    _returned: threading.Event = field(default_factory=threading.Event, repr=False)
    _release: threading.Event = field(default_factory=threading.Event, repr=False)
    _error: BaseException | None = field(default=None, repr=False)
    _session: _Session | None = field(default=None, repr=False)
    _threads: int | None = field(default=None, repr=False)

    @property
    def joins_cluster(self) -> bool:
        """Whether this start connects to an existing cluster (``address`` given) rather than starting Ray."""
        return bool(self.init_args.get("address"))

    def done(self) -> bool:
        """Whether ``ray.init`` has returned (or failed)."""
        return self._thread is None or self._returned.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until ``ray.init`` has returned.

        Parameters
        ----------
        timeout:
            Seconds to wait at most; None waits as long as it takes.

        Raises
        ------
        FederationError
            If ``ray.init`` failed (the cause is chained) or did not return within ``timeout``.
        """
        address = self.init_args.get("address")
        if self._thread is not None and not self._returned.wait(timeout):
            if address:
                raise FederationError(
                    f"the Ray cluster at {address} did not let this process join within {timeout:g} s; "
                    "check that its head is running (ray status) and that the address is its GCS port."
                )
            raise FederationError(f"Ray did not start within {timeout} s (use --verbose to see its logs).")
        if self._error is not None and address:
            detail = " ".join(str(self._error).split())[:300] or type(self._error).__name__
            raise FederationError(
                f"could not join the Ray cluster at {address} ({type(self._error).__name__}: {detail}); "
                "check that its head is running (ray status) and that the address is its GCS port."
            ) from self._error
        if self._error is not None:
            detail = " ".join(str(self._error).split())[:300] or type(self._error).__name__
            raise FederationError(
                f"Ray could not start ({type(self._error).__name__}: {detail}); "
                "run with --verbose to see Ray's logs."
            ) from self._error

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            if self.joins_cluster:  # nothing is spawned here: no environment to hand down
                _check_reachable(str(self.init_args["address"]))
                ray.init(**self.init_args)
            else:
                with _lean_start(self.lean, self.init_args, self._threads):
                    ray.init(**self.init_args)
            self._session = _session_of(_global_node())
        except BaseException as exc:  # kept for wait(), which runs in the caller's thread
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started
            self._returned.set()
        if self._error is None:
            # The thread that called ray.init must outlive the driver's use of Ray: once it
            # has exited, the driver's next call to the GCS hangs (Ray 2.55, measured). It
            # parks here until stop_ray has shut Ray down.
            self._release.wait()

    def _end(self) -> None:
        """Let the parked start thread exit (after ray.shutdown) and join it."""
        if self._thread is not None:
            self._returned.wait()
            self._release.set()
            self._thread.join()


_lock = threading.Lock()
_current: RayStart | None = None  # the last start_ray, until stop_ray


def start_ray(
    init_args: dict[str, Any],
    *,
    preload: Sequence[str] = (),
    threads_per_worker: int | None = None,
    lean: bool = True,
) -> RayStart:
    """Start ``ray.init(**init_args)`` in a background thread and return at once.

    Parameters
    ----------
    init_args:
        Keyword arguments for ``ray.init`` (the backend config's ``init_args``). Do not
        pass ``runtime_env``: a job-level one keeps actors off Ray's prestarted workers.
        With ``address`` (``"auto"`` or ``"HOST:PORT"``) this process joins that cluster
        instead of starting Ray; pass only driver-side arguments then (``logging_level``,
        ``log_to_driver``...), as ``ray.init`` refuses ``num_cpus`` and the like.
    preload:
        Modules every Ray worker imports as it starts (e.g. the ClientApp's module), so
        actors created later find them imported; added to
        ``_system_config["preload_python_modules"]``.
    threads_per_worker:
        Required with ``preload``: the workers' ``OMP_NUM_THREADS``, i.e. the CPUs each
        actor is given (``client_resources["num_cpus"]``). Ray sets it per actor, but only
        after a preloaded torch has read it; with the wrong count an actor's torch uses
        every core (slower rounds, and results that differ from one thread's).
    lean:
        Use the lean start (module docstring) if the installed Ray is in
        :data:`LEAN_RAY_VERSIONS` and Ray is started here; False always calls plain ``ray.init``.

    Returns
    -------
    RayStart
        Call :meth:`RayStart.wait` before using Ray, and :func:`stop_ray` at the end
        (also on errors: it waits for a start still under way).

    Notes
    -----
    Sets the :data:`RAY_ENV` variables if unset, and ``PYTHONPATH`` (this process's
    ``sys.path``) while Ray's processes are spawned, as Flower's Ray backend does. If Ray
    is already initialised in this process nothing is started and the handle is done.

    Raises
    ------
    ValueError
        If ``preload`` is given without ``threads_per_worker``, or when joining a cluster.
    RuntimeError
        If a start from an earlier call is still under way.
    """
    global _current
    args = dict(init_args)
    joining = bool(args.get("address"))
    if preload and joining:
        raise ValueError("start_ray: preload shapes workers this process starts, not a joined cluster's")
    if preload and (threads_per_worker is None or threads_per_worker < 1):
        raise ValueError(f"start_ray: preload needs threads_per_worker >= 1, got {threads_per_worker}")
    if preload:
        system_config = dict(args.get("_system_config") or {})
        # This module first: it sets OMP_NUM_THREADS before the others import torch.
        modules = [__name__, *system_config.get("preload_python_modules", []), *preload]
        system_config["preload_python_modules"] = list(dict.fromkeys(modules))
        args["_system_config"] = system_config
    use_lean = (
        lean and not joining and ray.__version__.startswith(LEAN_RAY_VERSIONS) and _lean_targets_exist()
    )
    handle = RayStart(args, lean=use_lean, _threads=threads_per_worker if preload else None)
    with _lock:
        if _current is not None and not _current.done():
            raise RuntimeError("start_ray was called while an earlier start is still under way")
        if ray.is_initialized():
            return handle
        for key, value in RAY_ENV.items():
            os.environ.setdefault(key, value)
        for module in _SHARED_LAZY_IMPORTS:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        handle._thread = threading.Thread(target=handle._run, name="fedmem-ray-start", daemon=True)
        _current = handle
        handle._thread.start()
    return handle


def stop_ray(timeout: float = 1.0) -> None:
    """Shut Ray down and make sure no process of its session is left; idempotent.

    Waits first for a :func:`start_ray` still under way. Safe to call when Flower has
    already shut Ray down (it then only ends what is left) or when Ray was never started.
    A process that joined a cluster only disconnects: no process of the cluster is touched.

    The raylet's workers (the actors) and agents are killed (SIGKILL) as soon as Ray is
    shut down: a run that has ended leaves nothing in them to save, and each would
    otherwise spend about a second finalizing its interpreter (torch, flwr and Ray
    modules) on the CPUs this process still needs.

    Parameters
    ----------
    timeout:
        Seconds to let Ray's head processes (GCS, raylet...) exit after ``ray.shutdown()``;
        survivors are then killed too.
    """
    global _current
    with _lock:
        handle, _current = _current, None
    # A start still joining a cluster after the caller's own wait (RayStart.wait) is abandoned
    # quickly: ray.init may keep retrying an address for minutes, and nothing of ours runs yet.
    if handle is not None and not handle._returned.wait(1.0 if handle.joins_cluster else None):
        logger.debug("ray.init still joining %s; abandoned in its daemon thread", handle.init_args["address"])
        return
    node = _global_node()
    session = _session_of(node) or (handle._session if handle is not None else None)
    if handle is not None and handle.joins_cluster:
        session = None  # the cluster's processes are not ours to end
    # Found before the raylet exits and its children become orphans no parent link leads to.
    heads, others = _find_processes(session) if session is not None else ({}, {})
    if ray.is_initialized():
        if session is not None:
            # A process that ignores SIGTERM costs ray.shutdown a 1 s grace period (the
            # autoscaler monitor does, when the lean start has not skipped it).
            for info in node.all_processes.get("monitor", []):
                with contextlib.suppress(OSError):
                    info.process.kill()
        ray.shutdown()
    if handle is not None:
        handle._end()
    _kill(_alive(others))
    deadline = time.monotonic() + timeout
    alive = _alive(heads)
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = _alive(heads)
    _kill(alive)
    if alive:
        logger.debug("killed %d Ray processes still running %s s after ray.shutdown()", len(alive), timeout)
    deadline = time.monotonic() + timeout  # SIGKILLed processes vanish at once; this is a bound
    while _alive(heads | others) and time.monotonic() < deadline:
        time.sleep(0.01)


def _check_reachable(address: str) -> None:
    """Raise ConnectionError at once when nothing answers at ``HOST:PORT`` ("auto" is Ray's to find)."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_SECONDS).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or type(exc).__name__})") from exc


# ----------------------------------------------------------------------------- lean start


def _lean_targets_exist() -> bool:
    node_cls = ray._private.node.Node
    return all(
        hasattr(node_cls, name) for name in ("start_monitor", "start_api_server", "start_log_monitor")
    ) and hasattr(ray._private.services, "get_node")


@contextlib.contextmanager
def _lean_start(lean: bool, init_args: dict[str, Any], threads: int | None) -> Iterator[None]:
    """Replace Ray's unneeded start-up steps while ``ray.init`` runs; export environment to Ray.

    Ray's processes inherit this process's environment when ``ray.init`` spawns them:
    ``PYTHONPATH`` (this ``sys.path``, as Flower's backend exports it) and the workers'
    thread count are set for that time only.
    """
    node_cls = ray._private.node.Node
    services = ray._private.services
    saved_env = {key: os.environ.get(key) for key in ("PYTHONPATH", _THREADS_ENV)}
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    old_path = saved_env["PYTHONPATH"]
    os.environ["PYTHONPATH"] = pythonpath + (os.pathsep + old_path if old_path else "")
    if threads is not None:
        os.environ[_THREADS_ENV] = str(threads)
    saved = {
        "start_monitor": node_cls.start_monitor,
        "start_api_server": node_cls.start_api_server,
        "start_log_monitor": node_cls.start_log_monitor,
    }
    get_node = services.get_node
    if lean:

        def no_monitor(self: Any) -> None:
            pass

        def no_api_server(self: Any, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            self._webui_url = None

        def polled_get_node(gcs_address: str, node_id: str) -> Any:
            _wait_registered(gcs_address, node_id)
            return get_node(gcs_address, node_id)

        setattr(node_cls, "start_monitor", no_monitor)  # noqa: B010 (a method: mypy refuses `=`)
        setattr(node_cls, "start_api_server", no_api_server)  # noqa: B010
        if init_args.get("log_to_driver") is False:
            setattr(node_cls, "start_log_monitor", no_monitor)  # noqa: B010
        services.get_node = polled_get_node
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(node_cls, name, method)
        services.get_node = get_node
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait_registered(gcs_address: str, node_id: str) -> None:
    """Poll the GCS until the raylet ``node_id`` has registered (Ray's own wait then returns at once)."""
    try:
        client = getattr(ray._raylet, "GcsClient")(address=gcs_address)  # noqa: B009 (no stub)
        deadline = time.monotonic() + _RAYLET_WAIT_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the GCS may still be coming up: ask again
                if any(key.hex() == node_id for key in client.get_all_node_info(timeout=1)):
                    return
            time.sleep(_POLL_SECONDS)
    except Exception:  # anything unexpected: leave the wait to Ray
        logger.debug("polling the GCS for the raylet failed", exc_info=True)


# ----------------------------------------------------------------------------- processes


def _global_node() -> Any:
    """The Ray node object of this process (None if Ray is not initialised here)."""
    return getattr(ray._private.worker, "_global_node", None)


@dataclass(frozen=True)
class _Session:
    """What tells the processes of one Ray session apart from any other process."""

    head_pids: frozenset[int]  # started by ray.init in this process: GCS, raylet, ...
    raylet_pid: int | None  # its workers carry it in RAY_RAYLET_PID; its agents are its children
    session_dir: str  # on the command line of the head processes and the agents


def _session_of(node: Any) -> _Session | None:
    """The session this process started; None if it started none (it may have joined a cluster's)."""
    if node is None or not getattr(node, "head", False):
        # A joined cluster's node object names the cluster's session dir: matching processes
        # by it would end the cluster's raylet and workers.
        return None
    processes = node.all_processes
    raylets = processes.get("raylet", [])
    return _Session(
        head_pids=frozenset(info.process.pid for infos in processes.values() for info in infos),
        raylet_pid=raylets[0].process.pid if raylets else None,
        session_dir=node.get_session_dir_path(),
    )


def _find_processes(session: _Session) -> tuple[dict[int, int], dict[int, int]]:
    """The session's head processes and its other processes (agents, workers): pid -> start time."""
    heads: dict[int, int] = {}
    others: dict[int, int] = {}
    raylet = str(session.raylet_pid).encode()
    in_env = f"RAY_RAYLET_PID={session.raylet_pid}".encode()
    in_args = session.session_dir.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue
            start = int(fields[19])
            if pid in session.head_pids:
                heads[pid] = start
                continue
            found = session.raylet_pid is not None and fields[1] == raylet
            if not found:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found = in_args in f.read()
            if not found and session.raylet_pid is not None:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    found = in_env in f.read().split(b"\0")
        except (OSError, IndexError, ValueError):  # gone, or not ours to read
            continue
        if found:
            others[pid] = start
    return heads, others


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (None if gone): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == b"Z":  # exited, waiting to be reaped
        return None
    return int(fields[19])


def _alive(processes: dict[int, int]) -> dict[int, int]:
    return {pid: start for pid, start in processes.items() if _start_time(pid) == start}


def _kill(processes: dict[int, int]) -> None:
    for pid in processes:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
