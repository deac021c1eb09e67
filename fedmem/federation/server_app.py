"""Flower ServerApp: the engine's round loop driven over Flower's Grid.

:class:`FlowerExecutor` implements :class:`fedmem.simulation.Executor` with
Message API round trips. Node ids are random per run, so a first query round
maps partition ids to node ids; clients are then addressed by partition id,
sampled with the run's seeded RNG, and replies are keyed (hence sorted) by
partition id. Discovery happens once per session; every federation of a sweep
gets its own executor over the same Grid and node map. A reply carrying an error, or none at all, becomes a
:class:`~fedmem.simulation.ClientFailure`; the loop stops the run when too
many clients fail in one round.

The module-level ``app`` serves ``flwr run .``: it loads the scenario named by
the run config key ``scenario`` (overrides in ``set``, ``;``-separated).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedmem.config import Config, load_config
from fedmem.errors import FederationError
from fedmem.federation.records import read_arrays, read_metrics, request
from fedmem.federation.stop import Stop
from fedmem.simulation import Body, ClientFailure, run_scenario
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
            node_of[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(expected)) - set(node_of))
    if missing:
        raise FederationError(
            f"{len(missing)} of {expected} Flower nodes did not report their partition id "
            f"(first missing: {missing[0]}); check partition.num_clients and the Ray backend"
        )
    return node_of


def exchange(grid: Grid, messages: Sequence[Message], timeout: float | None, stop: Stop) -> list[Message]:
    """Push ``messages`` and pull their replies until all came, ``timeout`` passed, or a stop is asked.

    Grid.send_and_receive would block a stopped session forever (no reply ever comes once
    Flower's runtime is gone), so the wait polls ``stop`` itself.
    """
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting and (deadline is None or time.monotonic() < deadline):
        stop.check()
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if waiting:
            time.sleep(POLL_SECONDS)
    return replies


class FlowerExecutor:
    """Sends one federation's train / evaluate requests to the nodes holding the given partition ids."""

    def __init__(self, grid: Grid, cfg: Config, node_of: Mapping[int, int], stop: Stop) -> None:
        self.grid = grid
        self.config_json = cfg.to_json()
        self.timeout = cfg.runtime.round_timeout or None
        self.node_of = node_of
        self.stop = stop

    def _round_trip(
        self, kind: str, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Message | ClientFailure]:
        content = request(self.config_json, server_round, arrays)
        pid_of = {self.node_of[p]: p for p in pids}
        messages = [Message(content, dst_node_id=self.node_of[p], message_type=kind) for p in pids]
        out: dict[int, Message | ClientFailure] = {}
        for reply in exchange(self.grid, messages, self.timeout, self.stop):
            pid = pid_of[reply.metadata.src_node_id]
            if reply.has_error():
                out[pid] = ClientFailure(pid, short_reason(str(reply.error.reason)))
            else:
                out[pid] = reply
        for pid in pids:  # a hung client: no reply before runtime.round_timeout
            out.setdefault(
                pid, ClientFailure(pid, f"no reply within runtime.round_timeout = {self.timeout} s")
            )
        return out

    def train(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Update | ClientFailure]:
        out: dict[int, Update | ClientFailure] = {}
        for pid, reply in self._round_trip("train", server_round, pids, arrays).items():
            if isinstance(reply, ClientFailure):
                out[pid] = reply
                continue
            metrics = read_metrics(reply.content)
            num_examples = int(metrics.pop("num-examples"))
            out[pid] = Update(read_arrays(reply.content), metrics, num_examples)
        return out

    def evaluate(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Mapping[str, float] | ClientFailure]:
        out: dict[int, Mapping[str, float] | ClientFailure] = {}
        for pid, reply in self._round_trip("evaluate", server_round, pids, arrays).items():
            out[pid] = reply if isinstance(reply, ClientFailure) else read_metrics(reply.content)
        return out

    def score(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Arrays | ClientFailure]:
        out: dict[int, Arrays | ClientFailure] = {}
        for pid, reply in self._round_trip(SCORE, server_round, pids, arrays).items():
            out[pid] = reply if isinstance(reply, ClientFailure) else read_arrays(reply.content)
        return out


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the same run as ``fedmem run`` (results in ``runs/``)."""
    scenario = str(context.run_config.get("scenario", "default"))
    overrides = [s for s in str(context.run_config.get("set", "")).split(";") if s.strip()]
    cfg = load_config(scenario, overrides).with_runtime(engine="flower")
    stop = Stop()

    def session(c: Config, num_nodes: int, body: Body) -> None:
        node_of = discover(grid, num_nodes, stop)
        body(lambda shipped: FlowerExecutor(grid, shipped, node_of, stop))

    run_scenario(cfg, session)
