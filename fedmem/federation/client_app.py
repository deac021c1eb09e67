"""Flower ClientApp: unpack the request, call the engine's client function, pack the reply.

Each node's ``partition-id`` (from its node config) is the client id; the data
set and the parsed config are cached per Ray actor by ``fedmem.client``.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmem.client import evaluate_client, parse_config, score_client, train_client
from fedmem.federation.records import METRICS, metrics_record, put_arrays, read_arrays, read_request

app = ClientApp()


def _pid(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run)."""
    return Message(RecordDict({METRICS: MetricRecord({"partition-id": _pid(context)})}), reply_to=msg)


# Flower's code for "the ClientApp raised" (flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION).
CLIENT_RAISED = 2


def replying_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Reply to a client's exception with an error message that carries it whole.

    Left to Flower, the server would see only Ray's truncated repr of the actor; with this,
    the reason reads exactly as the in-process engine's (``"<ExceptionType>: <message>"``).
    """

    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            return Message(Error(code=CLIENT_RAISED, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
    return wrapped


@app.train()
@replying_errors
def train(msg: Message, context: Context) -> Message:
    """Run the strategy's fit hook; reply with the arrays it uploads and metrics incl. ``num-examples``."""
    config_json, server_round = read_request(msg.content)
    update = train_client(parse_config(config_json), _pid(context), server_round, read_arrays(msg.content))
    content = RecordDict({METRICS: metrics_record({**update.metrics, "num-examples": update.num_examples})})
    return Message(put_arrays(content, update.arrays), reply_to=msg)


@app.evaluate()
@replying_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate every personalized predictor on this client's test split."""
    config_json, server_round = read_request(msg.content)
    metrics = evaluate_client(
        parse_config(config_json), _pid(context), server_round, read_arrays(msg.content)
    )
    return Message(RecordDict({METRICS: metrics_record(metrics)}), reply_to=msg)


@app.evaluate("scores")
@replying_errors
def scores(msg: Message, context: Context) -> Message:
    """Per-example scores of this client's predictors (a leakage audit); only these arrays travel."""
    config_json, server_round = read_request(msg.content)
    arrays = score_client(parse_config(config_json), _pid(context), server_round, read_arrays(msg.content))
    return Message(put_arrays(RecordDict(), arrays), reply_to=msg)
