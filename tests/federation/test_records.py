from __future__ import annotations

import numpy as np

from fedmem.federation.records import read_request, read_weights, request
from fedmem.federation.server_app import short_reason


def test_weights_and_config_survive_a_request_exactly() -> None:
    weights = {
        "conv.0.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
        "steps": np.array(5, np.int64),
        "z": np.zeros((0, 3), np.float64),
    }
    content = request('{"a": 1}', 7, weights)
    assert read_request(content) == ('{"a": 1}', 7)
    back = read_weights(content)
    assert list(back) == list(weights)
    for key, value in weights.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


def test_short_reason_is_one_line_and_names_a_dead_process() -> None:
    ray = "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly\n\tclass_name: X'>"
    assert "worker process died" in short_reason(ray)
    plain = "<class 'ValueError'>:<'bad thing\nmore detail'>"
    assert short_reason(plain) == "ValueError: bad thing"
    assert len(short_reason("x" * 1000)) == 300
