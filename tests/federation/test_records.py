from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from fedmem.federation.records import (
    METRICS,
    error_reply,
    for_clients,
    metrics_record,
    pack_clients,
    put_arrays,
    read_arrays,
    read_error,
    read_metrics,
    read_pids,
    read_request,
    request,
    unpack_clients,
)
from fedmem.federation.server_app import short_reason


def test_named_arrays_and_config_survive_a_request_exactly() -> None:
    weights = {
        "conv.0.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
        "steps": np.array(5, np.int64),
        "z": np.zeros((0, 3), np.float64),
    }
    arrays: dict[str, dict[str, np.ndarray]] = {
        "model": weights,
        "cluster/1": {"w": np.ones(3, np.float32)},
        "c": {},
    }
    content = request('{"a": 1}', 7, arrays)
    assert read_request(content) == ('{"a": 1}', 7)
    back = read_arrays(content)
    assert list(back) == list(arrays)
    assert back["c"] == {} and list(back["model"]) == list(weights)
    for name, sent in arrays.items():
        for key, value in sent.items():
            got = back[name][key]
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)


def test_short_reason_is_one_line_and_names_a_dead_process() -> None:
    ray = "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly\n\tclass_name: X'>"
    assert "worker process died" in short_reason(ray)
    plain = "<class 'ValueError'>:<'bad thing\nmore detail'>"
    assert short_reason(plain) == "ValueError: bad thing"
    assert len(short_reason("x" * 1000)) == 300


def test_short_reason_keeps_the_clients_own_exception_from_a_ray_task_error() -> None:
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
        "  File \"x.py\", line 3, in run\n    raise RuntimeError('boom')\nRuntimeError: boom at round 2'>"
    )
    assert short_reason(ray) == "RuntimeError: boom at round 2"


def test_a_request_for_several_clients_shares_the_arrays_and_names_the_clients() -> None:
    content = request('{"a": 1}', 3, {"model": {"w": np.arange(4, dtype=np.float32)}})
    assert read_pids(content) == []  # as built: for the receiving node's own client
    batch = for_clients(content, [7, 2, 11])
    assert read_pids(batch) == [7, 2, 11]
    assert read_request(batch) == ('{"a": 1}', 3)
    assert batch["arrays/model"] is content["arrays/model"]  # serialized once, whatever the clients
    assert read_pids(content) == []  # the original request is left as it was
    np.testing.assert_array_equal(read_arrays(batch)["model"]["w"], np.arange(4, dtype=np.float32))


def test_packed_client_replies_unpack_to_each_clients_own_records() -> None:
    replies = {
        12: put_arrays(
            RecordDict({METRICS: metrics_record({"loss": 0.5, "num-examples": 3})}),
            {"model": {"w": np.full(2, 12.0, np.float32)}, "c_delta": {"w": np.ones(2)}},
        ),
        1: RecordDict({METRICS: metrics_record({"loss": 1.5, "num-examples": 4})}),
        2: error_reply("ValueError: client 2 had no data"),
    }
    back = unpack_clients(pack_clients(replies))
    assert sorted(back) == [1, 2, 12]
    assert read_metrics(back[12]) == {"loss": 0.5, "num-examples": 3.0}
    assert sorted(read_arrays(back[12])) == ["c_delta", "model"]
    np.testing.assert_array_equal(read_arrays(back[12])["model"]["w"], np.full(2, 12.0, np.float32))
    assert read_arrays(back[1]) == {} and read_metrics(back[1])["loss"] == 1.5
    assert read_error(back[1]) is None
    assert read_error(back[2]) == "ValueError: client 2 had no data"


def test_arrays_in_flowers_own_serialization_are_read_too() -> None:
    from flwr.app import Array, ArrayRecord

    from fedmem.federation.records import record_to_weights, weights_to_record

    value = np.arange(6, dtype=">i2").reshape(2, 3)  # big-endian: the byte order must survive
    flowers = ArrayRecord(array_dict={"w": Array(value)})
    for record in (flowers, weights_to_record({"w": value})):
        got = record_to_weights(record)["w"]
        assert got.dtype == value.dtype and got.flags.writeable
        np.testing.assert_array_equal(got, value)
