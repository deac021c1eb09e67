"""Conversions between fedmem's values and Flower records."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmem.strategy import Weights

WEIGHTS, METRICS, REQUEST = "weights", "metrics", "request"


def weights_to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A state dict of numpy arrays as an ArrayRecord (keys and order kept)."""
    # np.asarray(order="C"), not ascontiguousarray: the latter turns 0-d buffers into shape (1,)
    return ArrayRecord(array_dict={k: Array(np.asarray(v, order="C")) for k, v in weights.items()})


def record_to_weights(record: ArrayRecord) -> Weights:
    """Inverse of :func:`weights_to_record`."""
    return {k: v.numpy() for k, v in record.items()}


def request(
    config_json: str, server_round: int, weights: Mapping[str, np.ndarray] | None = None
) -> RecordDict:
    """A train / evaluate request: the shipped config, the round and (optionally) weights."""
    content = RecordDict({REQUEST: ConfigRecord({"config": config_json, "round": server_round})})
    if weights is not None:
        content[WEIGHTS] = weights_to_record(weights)
    return content


def read_request(content: RecordDict) -> tuple[str, int]:
    """(config JSON, round) from a request."""
    record = content.config_records[REQUEST]
    return str(record["config"]), int(str(record["round"]))


def read_weights(content: RecordDict) -> Weights:
    """The weights a request or a train reply carries."""
    return record_to_weights(content.array_records[WEIGHTS])


def read_metrics(content: RecordDict) -> dict[str, float]:
    """The metrics a reply carries, as floats."""
    return {k: float(v) for k, v in content.metric_records[METRICS].items()}  # type: ignore[arg-type]


def metrics_record(metrics: Mapping[str, float]) -> MetricRecord:
    """Floats as a MetricRecord."""
    return MetricRecord({k: float(v) for k, v in metrics.items()})
