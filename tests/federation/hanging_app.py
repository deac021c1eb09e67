"""A ClientApp in which partition 0 hangs (sleeps) when asked to train in round 1; otherwise fedmem's."""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmem.federation import client_app as real
from fedmem.federation.records import read_request

HANG_SECONDS = 15.0

app = ClientApp()
app.query()(real.query)
app.evaluate()(real.evaluate)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _, server_round = read_request(msg.content)
    if int(context.node_config["partition-id"]) == 0 and server_round == 1:
        time.sleep(HANG_SECONDS)
    return real.train(msg, context)
