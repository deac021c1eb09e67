"""Conversions between fedmem's values and Flower records.

Named arrays travel as one ArrayRecord per name, under the record key ``arrays/<name>``
(``arrays/model``, ``arrays/cluster/0``...), beside a ConfigRecord (the request) or a
MetricRecord (the reply's metrics).

One message carries several clients (cross-device runs have thousands a round, and Flower's
per-message cost, not the clients' compute, dominated them): the request lists their
partition ids and carries the broadcast arrays once; the reply holds each client's records
under its own prefix ``client/<pid>/`` (``client/7/metrics``, ``client/7/arrays/model``), or
``client/<pid>/error`` (a ConfigRecord with the reason) when that client raised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmem.updates import Arrays

ARRAYS, METRICS, REQUEST, ERROR, CLIENT = "arrays/", "metrics", "request", "error", "client/"


# Array.stype of fedmem's arrays: the C-order bytes as they lie in memory, the dtype as numpy's
# dtype.str (byte order included). Flower's own stype writes and parses an .npy header for every
# tensor, which was most of a client's transport cost (several ms for the 114k-parameter CNN).
RAW = "fedmem.raw"


def _to_array(value: np.ndarray) -> Array:
    # np.asarray(order="C"), not ascontiguousarray: the latter turns 0-d buffers into shape (1,)
    a = np.asarray(value, order="C")
    return Array(a.dtype.str, tuple(int(d) for d in a.shape), RAW, a.tobytes())


def _from_array(array: Array) -> np.ndarray:
    if array.stype != RAW:  # Flower's serialization (a record some other app made)
        return array.numpy()
    # a copy: the bytes are read-only, and whoever receives the weights may write into them
    return np.frombuffer(array.data, dtype=np.dtype(array.dtype)).reshape(array.shape).copy()


def weights_to_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A state dict of numpy arrays as an ArrayRecord (keys, order, dtypes and shapes kept)."""
    return ArrayRecord(array_dict={k: _to_array(v) for k, v in weights.items()})


def record_to_weights(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Inverse of :func:`weights_to_record` (also reads arrays in Flower's own serialization)."""
    return {k: _from_array(v) for k, v in record.items()}


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
    """A train / evaluate request: the shipped config, the round and (optionally) named arrays.

    As it stands it is for the client that the receiving node holds; :func:`for_clients` names others.
    """
    content = RecordDict({REQUEST: ConfigRecord({"config": config_json, "round": server_round})})
    return put_arrays(content, arrays or {})


def for_clients(content: RecordDict, pids: Sequence[int]) -> RecordDict:
    """A copy of the request ``content`` for clients ``pids``; the arrays are shared, not copied."""
    out = RecordDict(dict(content))
    out[REQUEST] = ConfigRecord({**content[REQUEST], "pids": [int(p) for p in pids]})  # type: ignore[dict-item]
    return out


def read_request(content: RecordDict) -> tuple[str, int]:
    """(config JSON, round) from a request."""
    record = content.config_records[REQUEST]
    return str(record["config"]), int(str(record["round"]))


def read_pids(content: RecordDict) -> list[int]:
    """The partition ids a request asks for; empty: the receiving node's own."""
    pids = content[REQUEST].get("pids", [])
    return [int(p) for p in pids]  # type: ignore[union-attr]


def read_metrics(content: RecordDict) -> dict[str, float]:
    """The metrics a reply carries, as floats."""
    return {k: float(v) for k, v in content.metric_records[METRICS].items()}  # type: ignore[arg-type]


def metrics_record(metrics: Mapping[str, float]) -> MetricRecord:
    """Floats as a MetricRecord."""
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def error_reply(reason: str) -> RecordDict:
    """One client's reply saying that it raised, with ``reason`` (``"<Type>: <message>"``)."""
    return RecordDict({ERROR: ConfigRecord({"reason": reason})})


def read_error(content: RecordDict) -> str | None:
    """The reason one client's reply gives for raising, or None if it did not raise."""
    record = content.get(ERROR)
    return str(record["reason"]) if isinstance(record, ConfigRecord) else None


def _prefix(pid: int) -> str:
    return f"{CLIENT}{pid}/"


def pack_clients(replies: Mapping[int, RecordDict]) -> RecordDict:
    """Several clients' replies as one: client ``pid``'s records under ``client/<pid>/``."""
    out = RecordDict()
    for pid, content in replies.items():
        for key, record in content.items():
            out[_prefix(pid) + key] = record
    return out


def unpack_clients(content: RecordDict) -> dict[int, RecordDict]:
    """Inverse of :func:`pack_clients`, in one pass over the records (the records are not copied)."""
    out: dict[int, RecordDict] = {}
    for key, record in content.items():
        if key.startswith(CLIENT):
            pid, _, rest = key[len(CLIENT) :].partition("/")
            out.setdefault(int(pid), RecordDict())[rest] = record
    return out
