"""Conversions between fedmem's values and Flower records.

Named arrays travel as one ArrayRecord per name, under the record key ``arrays/<name>``
(``arrays/model``, ``arrays/cluster/0``...), beside a ConfigRecord (the request) or a
MetricRecord (the reply's metrics).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmem.updates import Arrays

ARRAYS, METRICS, REQUEST = "arrays/", "metrics", "request"


def weights_to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A state dict of numpy arrays as an ArrayRecord (keys and order kept)."""
    # np.asarray(order="C"), not ascontiguousarray: the latter turns 0-d buffers into shape (1,)
    return ArrayRecord(array_dict={k: Array(np.asarray(v, order="C")) for k, v in weights.items()})


def record_to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Inverse of :func:`weights_to_record`."""
    return {k: v.numpy() for k, v in record.items()}


def put_arrays(content: RecordDict, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> RecordDict:
    """Add one ArrayRecord per name to ``content`` (in place; returned for chaining)."""
    for name, weights in arrays.items():
        content[ARRAYS + name] = weights_to_record(weights)
    return content


def read_arrays(content: RecordDict) -> Arrays:
    """The named arrays a request or a reply carries."""
    return {
        key[len(ARRAYS) :]: record_to_weights(record)
        for key, record in content.array_records.items()
        if key.startswith(ARRAYS)
    }


def request(
    config_json: str, server_round: int, arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None
) -> RecordDict:
    """A train / evaluate request: the shipped config, the round and (optionally) named arrays."""
    content = RecordDict({REQUEST: ConfigRecord({"config": config_json, "round": server_round})})
    return put_arrays(content, arrays or {})


def read_request(content: RecordDict) -> tuple[str, int]:
    """(config JSON, round) from a request."""
    record = content.config_records[REQUEST]
    return str(record["config"]), int(str(record["round"]))


def read_metrics(content: RecordDict) -> dict[str, float]:
    """The metrics a reply carries, as floats."""
    return {k: float(v) for k, v in content.metric_records[METRICS].items()}  # type: ignore[arg-type]


def metrics_record(metrics: Mapping[str, float]) -> MetricRecord:
    """Floats as a MetricRecord."""
    return MetricRecord({k: float(v) for k, v in metrics.items()})
