from __future__ import annotations

import numpy as np

from fedmem.federation.records import read_arrays, read_request, request
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
