"""Flower ClientApp: unpack a request, call the engine's client function for each client it names, reply.

A request names the partition ids it is for (several clients per message: see
``fedmem.federation.records``); one without them is for the node's own ``partition-id``
(from its node config). The data set and the parsed config are cached per Ray actor by
``fedmem.client``; the broadcast arrays are read once per message and shared by its clients,
as the in-process engine shares them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmem.client import evaluate_client, parse_config, score_client, train_client
from fedmem.config import Config
from fedmem.federation.records import (
    METRICS,
    error_reply,
    metrics_record,
    pack_clients,
    put_arrays,
    read_arrays,
    read_pids,
    read_request,
)
from fedmem.strategy import Update
from fedmem.updates import Arrays

app = ClientApp()

T = TypeVar("T")


def _pid(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run)."""
    return Message(RecordDict({METRICS: MetricRecord({"partition-id": _pid(context)})}), reply_to=msg)


# Flower's code for "the ClientApp raised" (flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION).
CLIENT_RAISED = 2


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def replying_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Reply to an exception outside any one client (a bad request) with an error message carrying it whole.

    Left to Flower, the server would see only Ray's truncated repr of the actor; with this,
    the reason reads exactly as the in-process engine's (``"<ExceptionType>: <message>"``).
    """

    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            return Message(Error(code=CLIENT_RAISED, reason=_reason(exc)), reply_to=msg)

    wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
    return wrapped


def each_client(
    msg: Message,
    context: Context,
    work: Callable[[Config, int, int, Arrays], T],
    pack: Callable[[T], RecordDict],
) -> Message:
    """Run ``work(cfg, pid, round, received)`` for every client the request names; one reply for all.

    A client that raises gets an error record with the reason, as the in-process engine
    records it, and the others go on.
    """
    config_json, server_round = read_request(msg.content)
    cfg = parse_config(config_json)
    received = read_arrays(msg.content)
    replies: dict[int, RecordDict] = {}
    for pid in read_pids(msg.content) or [_pid(context)]:
        try:
            replies[pid] = pack(work(cfg, pid, server_round, received))
        except Exception as exc:
            replies[pid] = error_reply(_reason(exc))
    return Message(pack_clients(replies), reply_to=msg)


def _update_reply(update: Update) -> RecordDict:
    content = RecordDict({METRICS: metrics_record({**update.metrics, "num-examples": update.num_examples})})
    return put_arrays(content, update.arrays)


@app.train()
@replying_errors
def train(msg: Message, context: Context) -> Message:
    """Run the strategy's fit hook; reply with the arrays it uploads and metrics incl. ``num-examples``."""
    return each_client(msg, context, train_client, _update_reply)


@app.evaluate()
@replying_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate every personalized predictor on this client's test split."""
    return each_client(
        msg, context, evaluate_client, lambda metrics: RecordDict({METRICS: metrics_record(metrics)})
    )


@app.evaluate("scores")
@replying_errors
def scores(msg: Message, context: Context) -> Message:
    """Per-example scores of this client's predictors (a leakage audit); only these arrays travel."""
    return each_client(msg, context, score_client, lambda arrays: put_arrays(RecordDict(), arrays))
