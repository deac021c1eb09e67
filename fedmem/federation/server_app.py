"""Flower ServerApp: the engine's round loop driven over Flower's Grid.

:class:`FlowerExecutor` implements :class:`fedmem.simulation.Executor` with
Message API round trips. Node ids are random per run, so a first query round
maps the nodes' partition ids to node ids. Clients are sampled by partition id
with the run's seeded RNG and replies are keyed (hence sorted) by partition id.

A session has at most :data:`NODES_PER_ACTOR` nodes per actor, not one per client: node ``k``
of ``S`` serves the clients ``p`` with ``p % S == k``, all those asked in a round in ONE
message (records in ``fedmem.federation.records``). With one node per client, thousands of
clients cost Flower's in-memory runtime work in (nodes x messages in flight) on every 0.1 s
sweep (it scans every stored message for every node), which was most of a cross-device
round; with no more clients than nodes each message carries one client, as before.

Discovery happens once per session; every federation of a sweep gets its own executor over the
same Grid and node map. A client that raised, or whose message got an error or no reply at all,
becomes a :class:`~fedmem.simulation.ClientFailure`; the loop stops the run when too many
clients fail in one round.

The module-level ``app`` serves ``flwr run .``: it loads the scenario named by
the run config key ``scenario`` (overrides in ``set``, ``;``-separated).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmem.config import Config, load_config
from fedmem.errors import FederationError
from fedmem.federation.records import (
    for_clients,
    read_arrays,
    read_error,
    read_metrics,
    request,
    unpack_clients,
)
from fedmem.federation.stop import Stop
from fedmem.jobs import run_scenario
from fedmem.simulation import Body, ClientFailure
from fedmem.strategy import Update
from fedmem.updates import Arrays

_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")


def short_reason(reason: str) -> str:
    """One line from Flower's error reason (Ray's are multi-line reprs), naming a dead process as such."""
    if "ActorDiedError" in reason:
        return "the client's worker process died (segfault or out of memory?); Ray: ActorDiedError"
    text = reason.replace("<class '", "").replace("'>:<'", ": ").strip("<>'")
    # An exception that escaped a ClientApp arrives as Ray's task error: its last
    # "<Type>: <message>" line is the client's own exception.
    raised = [line.strip() for line in text.splitlines() if _RAISED.match(line.strip())]
    if "RayTaskError" in text and raised:
        text = raised[-1]
    first = text.splitlines()[0] if text else "unknown error"
    return first if len(first) <= 300 else first[:297] + "..."


POLL_SECONDS = 0.05
SCORE = "evaluate.scores"  # the audit's request: per-example scores (client_app.scores)
# Messages per actor and round when clients outnumber nodes: enough that the last message of a
# round is a short tail on a loaded machine, few enough that Flower's sweeps stay cheap.
NODES_PER_ACTOR = 16

T = TypeVar("T")


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc; elsewhere nothing).

    A round's replies arrive as one bytes object per tensor and are decoded into arrays while the
    bytes are freed: glibc kept those holes in its arenas, about 1 GiB of the driver's memory
    at 5,000 clients.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def supernodes(cfg: Config, num_clients: int, actors: int | None = None) -> int:
    """How many Flower nodes a session of ``num_clients`` clients starts (each serves several clients).

    ``actors``: how many client processes the session runs; by default those of a local Ray
    (``runtime.num_cpus`` or this machine's CPUs, over ``runtime.cpus_per_client``). A session on
    a Ray cluster must pass the cluster's count, or it would leave actors without messages.
    """
    if actors is None:
        actors = (cfg.runtime.num_cpus or os.cpu_count() or 1) // cfg.runtime.cpus_per_client
    return min(num_clients, NODES_PER_ACTOR * max(1, actors))


def discover(grid: Grid, expected: int, stop: Stop, timeout: float = 120.0) -> dict[int, int]:
    """Map partition ids 0..expected-1 to Flower node ids (random per session), asking every node once."""
    deadline = time.monotonic() + timeout
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        stop.check()
        time.sleep(POLL_SECONDS)
        node_ids = list(grid.get_node_ids())
    queries = [Message(request("{}", 0), dst_node_id=n, message_type="query") for n in node_ids]
    node_of: dict[int, int] = {}
    for reply in exchange(grid, queries, timeout, stop):
        if not reply.has_error():
            pid = int(read_metrics(reply.content)["partition-id"])
            if pid < expected:  # a deployment may start more nodes than a session uses
                node_of[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(expected)) - set(node_of))
    if missing:
        raise FederationError(
            f"{len(missing)} of {expected} Flower nodes did not report their partition id "
            f"(first missing: {missing[0]}); check partition.num_clients and the Ray backend"
        )
    return node_of


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None, stop: Stop) -> Iterator[Message]:
    """Push ``messages``; yield their replies as they come until all came, ``timeout`` passed or a stop.

    Yielded one by one so that each reply can be read and dropped before the next (a round's
    replies hold every client's upload). Grid.send_and_receive would block a stopped session
    forever (no reply ever comes once Flower's runtime is gone), so the wait polls ``stop`` itself.
    """
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    while waiting and (deadline is None or time.monotonic() < deadline):
        stop.check()
        got = list(grid.pull_messages(waiting))
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        while got:
            yield got.pop(0)
        if waiting:
            time.sleep(POLL_SECONDS)


class FlowerExecutor:
    """Sends one federation's train / evaluate requests to the nodes serving the given partition ids.

    ``node_of`` maps the session's node partition ids ``0..S-1`` to node ids; client ``p`` is
    served by node ``p % S``.
    """

    def __init__(self, grid: Grid, cfg: Config, node_of: Mapping[int, int], stop: Stop) -> None:
        self.grid = grid
        self.config_json = cfg.to_json()
        self.timeout = cfg.runtime.round_timeout or None
        self.node_of = node_of
        self.stop = stop

    def _round_trip(
        self,
        kind: str,
        server_round: int,
        pids: Sequence[int],
        arrays: Arrays,
        read: Callable[[RecordDict], T],
    ) -> dict[int, T | ClientFailure]:
        batches: dict[int, list[int]] = {}  # node id -> the clients it is asked for
        for p in pids:
            batches.setdefault(self.node_of[p % len(self.node_of)], []).append(p)
        content = request(self.config_json, server_round, arrays)  # the arrays serialized once a round
        messages = [
            Message(for_clients(content, batch), dst_node_id=node, message_type=kind)
            for node, batch in batches.items()
        ]
        out: dict[int, T | ClientFailure] = {}
        for reply in exchange(self.grid, messages, self.timeout, self.stop):
            batch = batches[reply.metadata.src_node_id]
            if reply.has_error():  # the whole message failed: its worker process died, or a bad request
                reason = short_reason(str(reply.error.reason))
                out.update({pid: ClientFailure(pid, reason) for pid in batch})
                continue
            clients = unpack_clients(reply.content)
            for pid in batch:
                one = clients.pop(pid, RecordDict())
                raised = read_error(one)
                out[pid] = read(one) if raised is None else ClientFailure(pid, short_reason(raised))
        for pid in pids:  # a hung client: no reply before runtime.round_timeout
            out.setdefault(
                pid, ClientFailure(pid, f"no reply within runtime.round_timeout = {self.timeout} s")
            )
        release_freed_memory()
        return out

    def train(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Update | ClientFailure]:
        return self._round_trip("train", server_round, pids, arrays, _update)

    def evaluate(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Mapping[str, float] | ClientFailure]:
        return self._round_trip("evaluate", server_round, pids, arrays, read_metrics)

    def score(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Arrays | ClientFailure]:
        return self._round_trip(SCORE, server_round, pids, arrays, read_arrays)


def _update(content: RecordDict) -> Update:
    metrics = read_metrics(content)
    num_examples = int(metrics.pop("num-examples"))
    return Update(read_arrays(content), metrics, num_examples)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the same run as ``fedmem run`` (results in ``runs/``)."""
    scenario = str(context.run_config.get("scenario", "default"))
    overrides = [s for s in str(context.run_config.get("set", "")).split(";") if s.strip()]
    cfg = load_config(scenario, overrides).with_runtime(engine="flower")
    stop = Stop()

    def session(c: Config, num_nodes: int, body: Body) -> None:
        node_of = discover(grid, supernodes(c, num_nodes), stop)
        body(lambda shipped: FlowerExecutor(grid, shipped, node_of, stop))

    run_scenario(cfg, session)
