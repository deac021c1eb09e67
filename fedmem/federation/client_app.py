"""Flower ClientApp: unpack the request, call the engine's client function, pack the reply.

Each node's ``partition-id`` (from its node config) is the client id; the data
set and the parsed config are cached per Ray actor by ``fedmem.client``.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmem.client import evaluate_client, parse_config, train_client
from fedmem.federation.records import METRICS, metrics_record, put_arrays, read_arrays, read_request

app = ClientApp()


def _pid(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (node ids are random per run)."""
    return Message(RecordDict({METRICS: MetricRecord({"partition-id": _pid(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the strategy's fit hook; reply with the arrays it uploads and metrics incl. ``num-examples``."""
    config_json, server_round = read_request(msg.content)
    update = train_client(parse_config(config_json), _pid(context), server_round, read_arrays(msg.content))
    content = RecordDict({METRICS: metrics_record({**update.metrics, "num-examples": update.num_examples})})
    return Message(put_arrays(content, update.arrays), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate every personalized predictor on this client's test split."""
    config_json, server_round = read_request(msg.content)
    metrics = evaluate_client(
        parse_config(config_json), _pid(context), server_round, read_arrays(msg.content)
    )
    return Message(RecordDict({METRICS: metrics_record(metrics)}), reply_to=msg)
