"""The ClientApp's handling of a message for several clients, without starting Flower."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message, Metadata, RecordDict

from fedmem.config import Config
from fedmem.federation.client_app import each_client
from fedmem.federation.records import (
    METRICS,
    for_clients,
    metrics_record,
    read_error,
    read_metrics,
    request,
    unpack_clients,
)
from fedmem.updates import Arrays


def _message(content: RecordDict) -> Message:
    # Message(content, dst_node_id=...) needs a running Flower app for its run id: give the metadata
    meta = Metadata(1, "m1", 0, 9, "", "", 0.0, 3600.0, "train")
    return Message(content, metadata=meta)  # type: ignore[call-overload]  # not in Flower's overloads


def _context(partition_id: int) -> Context:
    return Context(
        run_id=1, node_id=9, node_config={"partition-id": partition_id}, state=RecordDict(), run_config={}
    )


def test_every_named_client_runs_once_on_the_same_arrays_and_one_that_raises_fails_alone(
    tiny_config: Callable[..., Config],
) -> None:
    cfg = tiny_config()
    seen: list[tuple[int, int, int]] = []

    def work(c: Config, pid: int, server_round: int, received: Arrays) -> float:
        assert c == cfg
        if pid == 5:
            raise ValueError("client 5 is broken")
        seen.append((pid, server_round, id(received["model"]["w"])))
        return float(received["model"]["w"].sum() + pid)

    content = request(cfg.to_json(), 4, {"model": {"w": np.ones(3, np.float32)}})
    msg = _message(for_clients(content, [3, 5, 0]))
    reply = each_client(msg, _context(1), work, lambda v: RecordDict({METRICS: metrics_record({"v": v})}))

    clients = unpack_clients(reply.content)
    assert sorted(clients) == [0, 3, 5]
    assert read_metrics(clients[3]) == {"v": 6.0} and read_metrics(clients[0]) == {"v": 3.0}
    assert read_error(clients[5]) == "ValueError: client 5 is broken"
    assert [(p, r) for p, r, _ in seen] == [(3, 4), (0, 4)]
    assert len({key for _, _, key in seen}) == 1  # the arrays were read once for the whole message

    # a request naming no clients is for the node's own partition
    alone = each_client(
        _message(content),
        _context(2),
        work,
        lambda v: RecordDict({METRICS: metrics_record({"v": v})}),
    )
    assert {p: read_metrics(c) for p, c in unpack_clients(alone.content).items()} == {2: {"v": 5.0}}
