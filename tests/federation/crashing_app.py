"""A ClientApp whose process dies (os._exit) when partition 0 trains in round 1; otherwise fedmem's."""

from __future__ import annotations

import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmem.federation import client_app as real
from fedmem.federation.records import read_request

app = ClientApp()
app.query()(real.query)
app.evaluate()(real.evaluate)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _, server_round = read_request(msg.content)
    if int(context.node_config["partition-id"]) == 0 and server_round == 1:
        os._exit(1)  # a segfault or an OOM kill, as far as Ray can tell
    return real.train(msg, context)
