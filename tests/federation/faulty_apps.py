"""ClientApps that behave like fedmem's except that partition 0 misbehaves when asked to train in round 1."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmem.federation import client_app as real
from fedmem.federation.records import read_request

HANG_SECONDS = 15.0


def faulty_app(fault: Callable[[], None]) -> ClientApp:
    """fedmem's ClientApp, but ``fault()`` runs before partition 0 trains in round 1."""
    app = ClientApp()
    app.query()(real.query)
    app.evaluate()(real.evaluate)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        _, server_round = read_request(msg.content)
        if int(context.node_config["partition-id"]) == 0 and server_round == 1:
            fault()
        return real.train(msg, context)

    return app


def _die() -> None:
    os._exit(1)  # a segfault or an OOM kill, as far as Ray can tell


def _hang() -> None:
    time.sleep(HANG_SECONDS)


crashing_app = faulty_app(_die)
hanging_app = faulty_app(_hang)
