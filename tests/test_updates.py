"""Named-array numerics by hand, and update post-processing composed with strategies end to end."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fedmem.config import Config
from fedmem.seeding import rng
from fedmem.updates import add_noise, clip_update, global_norm, merge_average, subtract


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def test_merge_average_by_hand_with_partial_uploads_and_untouched_names() -> None:
    state = {"model": {"body": _f32(0, 0), "head": _f32(9)}, "c": {"w": _f32(5)}}
    uploads = [
        ({"model": {"body": _f32(1, 2)}}, 1.0),  # a FedRep-like client: body only
        ({"model": {"body": _f32(3, 6)}, "cluster/1": {"w": _f32(4)}}, 3.0),
    ]
    out = merge_average(state, uploads)
    np.testing.assert_array_equal(out["model"]["body"], _f32(2.5, 5.0))  # (1 + 9) / 4, (2 + 18) / 4
    np.testing.assert_array_equal(out["model"]["head"], _f32(9))  # nobody uploaded the head
    np.testing.assert_array_equal(out["c"]["w"], _f32(5))  # nobody uploaded c
    np.testing.assert_array_equal(out["cluster/1"]["w"], _f32(4))  # one uploader: its value
    assert state["model"]["body"].tolist() == [0, 0]  # pure: the input is not modified
    with pytest.raises(ValueError, match="different keys under 'model'"):
        merge_average(state, [({"model": {"body": _f32(1, 2)}}, 1.0), ({"model": {"head": _f32(1)}}, 1.0)])


def test_clip_update_scales_the_joint_delta_and_leaves_other_names_alone() -> None:
    received = {"model": {"a": _f32(1, 1), "b": _f32(0)}}
    uploaded = {
        "model": {"a": _f32(4, 5), "b": _f32(0), "n": np.array(3, np.int64)},
        "c_delta": {"x": _f32(7)},
    }
    # the update is (3, 4, 0): norm 5; clipped to 1 it becomes (0.6, 0.8, 0)
    out, norm = clip_update(uploaded, {**received, "model": {**received["model"], "n": np.array(0)}}, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(out["model"]["a"], [1.6, 1.8], rtol=1e-6)
    assert out["model"]["a"].dtype == np.float32 and out["model"]["n"] == 3  # integer buffers untouched
    np.testing.assert_array_equal(out["c_delta"]["x"], _f32(7))  # never received: not an update
    same, norm = clip_update(uploaded, {**received, "model": {**received["model"], "n": np.array(0)}}, 10.0)
    np.testing.assert_array_equal(same["model"]["a"], uploaded["model"]["a"])  # under the bound: unchanged


def test_global_norm_and_subtract_by_hand() -> None:
    assert global_norm([{"a": np.array([3.0])}, {"b": np.array([[4.0]])}]) == 5.0
    assert subtract({"a": _f32(3), "i": np.array(1)}, {"a": _f32(1), "i": np.array(0)}) == {"a": 2.0}


def test_noise_is_seeded_and_has_the_requested_scale() -> None:
    state = {"model": {"w": np.zeros(200_000, np.float32), "n": np.array(0)}, "server/m": {"w": np.zeros(1)}}
    a = add_noise(state, {"model": ["w"]}, 0.5, rng(0, "update-noise", 1))
    b = add_noise(state, {"model": ["w"]}, 0.5, rng(0, "update-noise", 1))
    np.testing.assert_array_equal(a["model"]["w"], b["model"]["w"])
    assert np.std(a["model"]["w"]) == pytest.approx(0.5, rel=0.01)  # 200k draws: std within 1 %
    assert a["server/m"]["w"][0] == 0.0 and state["model"]["w"].max() == 0.0


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_clipping_and_noise_compose_with_any_strategy(
    tiny_config: Callable[..., Config], strategy: str
) -> None:
    """One run with clip_norm + noise per strategy: every uploaded model update respects the bound."""
    from fedmem.client import initial_weights, train_client

    cfg = tiny_config(
        f"strategy.name={strategy}",
        "update.clip_norm=0.05",
        "update.noise_multiplier=1.0",
        "update.weighting='uniform'",
    )
    received = {"model": initial_weights(cfg)}
    cfg = cfg.with_runtime(run_dir=str(cfg.runtime.output_dir))
    update = train_client(cfg, 0, 1, received)
    if strategy == "local":  # uploads nothing: nothing to clip
        assert update.arrays == {}
        return
    delta = subtract(update.arrays["model"], received["model"])
    assert global_norm([delta]) <= 0.05 * (1 + 1e-5)
    assert update.metrics["update_norm"] > 0.05  # one local epoch moves further than that: it was clipped
