"""ClientApps like fedmem's, except that partition 0 misbehaves when asked to train in one round."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmem.federation import client_app as real
from fedmem.federation.records import ARRAYS, put_arrays, read_arrays, read_request

HANG_SECONDS = 25.0  # well past the test's 15 s round timeout

Fault = Callable[[Message], None]


def faulty_app(fault: Fault, fault_round: int = 1) -> ClientApp:
    """fedmem's ClientApp, but ``fault(msg)`` runs before partition 0 trains in round ``fault_round``."""
    app = ClientApp()
    app.query()(real.query)
    app.evaluate()(real.evaluate)

    @app.train()
    @real.replying_errors
    def train(msg: Message, context: Context) -> Message:
        _, server_round = read_request(msg.content)
        if int(context.node_config["partition-id"]) == 0 and server_round == fault_round:
            fault(msg)
        return real.train(msg, context)

    return app


def _die(msg: Message) -> None:
    os._exit(1)  # a segfault or an OOM kill, as far as Ray can tell


def _sigkill(msg: Message) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer sends
    time.sleep(HANG_SECONDS)  # not reached: the signal ends the process at once


def _raise(msg: Message) -> None:
    raise RuntimeError("boom in client 0: a message that must reach the user whole")


def _hang(msg: Message) -> None:
    time.sleep(HANG_SECONDS)


def _nan_weights(msg: Message) -> None:
    """Receive a global model whose floats are all NaN: local training then uploads NaN."""
    arrays = read_arrays(msg.content)
    for key in [k for k in msg.content.array_records if k.startswith(ARRAYS)]:
        del msg.content[key]
    poisoned = {
        name: {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in w.items()}
        for name, w in arrays.items()
    }
    put_arrays(msg.content, poisoned)


crashing_app = faulty_app(_die)
killed_app = faulty_app(_sigkill)
raising_app = faulty_app(_raise)
nan_app = faulty_app(_nan_weights)
# Round 2: round 1 warms the actors up (torch import, data load), so the deadline measures training.
hanging_app = faulty_app(_hang, fault_round=2)
