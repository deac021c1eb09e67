"""Before a federation runs on a Ray cluster: does every node have what its clients will need?

A client runs on whichever node Ray puts its actor, and reads three things there: fedmem's
code (the ClientApp, the strategies, Flower's actor), the data set (looked up on that
node's disks as :mod:`fedmem.data.datasets` does it) and the output directory (each client
writes per-client files under ``runtime.run_dir``, which the driver reads back, so the
directory must be one shared file system). :func:`check_cluster` sends one small task
pinned to every alive node that can host a client (Ray's ``NodeAffinitySchedulingStrategy``)
and raises one sentence naming each node that lacks any of them, before any round runs.

The task itself must not need fedmem to be unpickled, or a node without fedmem would only
give Ray's deserialization traceback: it is a function built inside :func:`_node_task`,
which cloudpickle ships by value, and it imports this module on the node itself.
"""

from __future__ import annotations

import importlib
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from fedmem.config import Config
from fedmem.errors import FederationError, FedmemError

#: Seconds all nodes together get to answer the check (a cold node imports torch and flwr).
CHECK_TIMEOUT = 180.0

#: What a client imports on its node: Flower's actor, fedmem's ClientApp and the strategies.
CLIENT_MODULES = ("flwr.simulation.ray_transport.ray_actor", "fedmem.federation.client_app", "strategies")

_MARKER_PREFIX = ".fedmem-cluster-check-"


@dataclass(frozen=True)
class NodeFindings:
    """What one node lacks (``missing`` is empty when it has everything).

    Attributes
    ----------
    ip:
        The node's address as Ray knows it.
    node_id:
        Ray's node id (hex).
    missing:
        One phrase per missing thing, each readable after "lacks" ("fedmem (...)").
    """

    ip: str
    node_id: str
    missing: tuple[str, ...] = ()


def describe(findings: Sequence[NodeFindings]) -> str | None:
    """One sentence naming every node that lacks something and what it lacks; None if none does.

    Parameters
    ----------
    findings:
        One entry per checked node, in any order (the sentence lists nodes by address).

    Returns
    -------
    str or None
        The sentence, ending with what each node needs and where that is documented.
    """
    lacking = sorted((f for f in findings if f.missing), key=lambda f: (f.ip, f.node_id))
    if not lacking:
        return None
    nodes = "; ".join(f"node {f.ip} (node id {f.node_id}) lacks {_join(f.missing)}" for f in lacking)
    checked = len(findings)
    return (
        f"{len(lacking)} of the {checked} Ray nodes that can run clients cannot: {nodes}; every such "
        "node needs fedmem installed in the Python that runs Ray there, the data set at the same path "
        "(or a download that works there) and the output directory on a file system shared with this "
        "machine (see docs/cluster.md)."
    )


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def inspect_node(
    dataset: str, root: str, download: bool, output_dir: str, marker: str, token: str
) -> list[str]:
    """On a node: what a client would lack there, one phrase per missing thing.

    Parameters
    ----------
    dataset, root, download:
        The data set as the clients load it (``data.dataset``, the absolute ``data.root``,
        ``data.download``).
    output_dir:
        The absolute output directory, under which the run directories are created.
    marker, token:
        A file the driver wrote in ``output_dir`` and its content: finding it proves the
        directory is the driver's, not a local one of the same name.

    Returns
    -------
    list of str
        Empty when the node has everything.
    """
    missing: list[str] = []
    for module in CLIENT_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # whatever the import raised, the client would raise it too
            missing.append(f"the module {module} ({_short(exc)})")
    if not missing:  # the data set's loader needs the modules above
        from fedmem.data.datasets import load_dataset

        try:
            load_dataset(dataset, root, download=download)
        except FedmemError as exc:  # its own sentence says where it looked and how to fix it
            missing.append(f"the data set {dataset} ({str(exc).rstrip('.')})")
        except Exception as exc:
            missing.append(f"the data set {dataset} ({_short(exc)})")
    missing.extend(_output_dir_problems(Path(output_dir), marker, token))
    return missing


def _output_dir_problems(directory: Path, marker: str, token: str) -> list[str]:
    if not directory.is_dir():
        return [f"the output directory {directory} (it does not exist on this node)"]
    try:
        shared = (directory / marker).read_text() == token
    except OSError:
        shared = False
    if not shared:
        return [f"the output directory {directory} shared with the driver (it is another directory there)"]
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=marker):
            pass
    except OSError as exc:
        return [f"write access to the output directory {directory} ({exc.strerror or type(exc).__name__})"]
    return []


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _node_task() -> Callable[..., list[str]]:
    """The check as a function defined here, inside a call, so cloudpickle ships it by value."""

    def run_check(*args: Any) -> list[str]:
        try:
            this = importlib.import_module("fedmem.federation.cluster")
        except Exception as exc:  # this module's helpers are not there: say it in place
            detail = " ".join(str(exc).split())[:300]
            return [f"fedmem ({type(exc).__name__}: {detail}; install it in the Python that runs Ray there)"]
        result: list[str] = this.inspect_node(*args)
        return result

    return run_check


def client_nodes(nodes: Sequence[dict[str, Any]], cpus_per_client: int) -> list[NodeFindings]:
    """The alive nodes of ``ray.nodes()`` with room for one client's actor (no findings yet)."""
    return [
        NodeFindings(str(n.get("NodeManagerAddress", "?")), str(n["NodeID"]))
        for n in nodes
        if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= cpus_per_client
    ]


@contextmanager
def _marker(directory: Path) -> Iterator[tuple[str, str]]:
    """A file only this check writes in ``directory``, removed afterwards: (name, content)."""
    token = uuid.uuid4().hex
    name = _MARKER_PREFIX + token
    path = directory / name
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    except OSError as exc:
        raise FederationError(
            f"cannot write in the output directory {directory} on this machine "
            f"({exc.strerror or type(exc).__name__}); set runtime.output_dir to a writable shared directory."
        ) from exc
    try:
        yield name, token
    finally:
        path.unlink(missing_ok=True)


def check_cluster(
    cfg: Config, timeout: float = CHECK_TIMEOUT, interrupted: Callable[[], bool] = lambda: False
) -> int:
    """Check every alive node that can host a client; call once connected to the cluster.

    Returns the number of client actors the cluster hosts (each node's CPUs over
    ``runtime.cpus_per_client``), which sizes the session's Flower nodes.

    Parameters
    ----------
    cfg:
        The session's config: data set, output directory and ``runtime.cpus_per_client``.
    timeout:
        Seconds all nodes together get to answer.
    interrupted:
        Polled while waiting (the session's stop event: Ctrl-C); True ends the check.

    Raises
    ------
    FederationError
        One sentence naming each node that lacks something (or that no node can host a
        client), before any round runs.
    KeyboardInterrupt
        If ``interrupted()`` became true before every node answered.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    per_client = cfg.runtime.cpus_per_client
    nodes = ray.nodes()
    candidates = client_nodes(nodes, per_client)
    if not candidates:
        sizes = ", ".join(
            f"{n.get('NodeManagerAddress', '?')}: {_cpus(n.get('Resources', {}).get('CPU', 0))}"
            for n in nodes
            if n.get("Alive")
        )
        raise FederationError(
            f"no alive node of the Ray cluster has the {per_client} CPUs runtime.cpus_per_client asks "
            f"for one client ({sizes or 'no alive node'}); lower runtime.cpus_per_client or add bigger nodes."
        )
    output_dir = Path(cfg.runtime.output_dir).expanduser().resolve()
    root = str(Path(cfg.data.root).expanduser().resolve())
    task = ray.remote(num_cpus=0, max_retries=0)(_node_task())
    with _marker(output_dir) as (marker, token):
        args = (cfg.data.dataset, root, cfg.data.download, str(output_dir), marker, token)
        refs = [
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(
                *args
            )
            for node in candidates
        ]
        try:
            ready = _wait_all(refs, timeout, interrupted)
            findings = [
                NodeFindings(node.ip, node.node_id, tuple(_answer(ref, ref in ready, timeout)))
                for node, ref in zip(candidates, refs, strict=True)
            ]
        finally:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in pending:  # a node that did not answer must not keep the task
                ray.cancel(ref, force=True)
    sentence = describe(findings)
    if sentence is not None:
        raise FederationError(sentence)
    return sum(
        int(n.get("Resources", {}).get("CPU", 0) // per_client)
        for n in nodes
        if n.get("Alive") and str(n["NodeID"]) in {c.node_id for c in candidates}
    )


def _wait_all(refs: list[Any], timeout: float, interrupted: Callable[[], bool]) -> list[Any]:
    """The refs done within ``timeout`` s, in short waits so that an interruption ends it soon."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, min(0.5, left)))
        if not pending or left <= 0:
            return list(ready)
        if interrupted():
            raise KeyboardInterrupt


def _cpus(count: float) -> str:
    return f"{count:g} CPU" if count == 1 else f"{count:g} CPUs"


def _answer(ref: Any, ready: bool, timeout: float) -> list[str]:
    if not ready:
        return [f"an answer to the check within {timeout:g} s (is the node overloaded or cut off?)"]
    try:
        found: list[str] = ray.get(ref)
    except Exception as exc:  # the task could not run there (worker crash, Python mismatch...)
        return [f"a worker able to run the check ({_short(exc)})"]
    return found
