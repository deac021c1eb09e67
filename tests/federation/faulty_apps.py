"""ClientApps like fedmem's, except that partition 0 misbehaves when asked to train in one round."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmem.federation import client_app as real
from fedmem.federation.records import read_request

HANG_SECONDS = 25.0  # well past the test's 15 s round timeout


def faulty_app(fault: Callable[[], None], fault_round: int = 1) -> ClientApp:
    """fedmem's ClientApp, but ``fault()`` runs before partition 0 trains in round ``fault_round``."""
    app = ClientApp()
    app.query()(real.query)
    app.evaluate()(real.evaluate)

    @app.train()
    @real.replying_errors
    def train(msg: Message, context: Context) -> Message:
        _, server_round = read_request(msg.content)
        if int(context.node_config["partition-id"]) == 0 and server_round == fault_round:
            fault()
        return real.train(msg, context)

    return app


def _die() -> None:
    os._exit(1)  # a segfault or an OOM kill, as far as Ray can tell


def _raise() -> None:
    raise RuntimeError("boom in client 0: a message that must reach the user whole")


def _hang() -> None:
    time.sleep(HANG_SECONDS)


crashing_app = faulty_app(_die)
raising_app = faulty_app(_raise)
# Round 2: round 1 warms the actors up (torch import, data load), so the deadline measures training.
hanging_app = faulty_app(_hang, fault_round=2)
