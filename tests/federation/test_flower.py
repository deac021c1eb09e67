"""End-to-end through Flower's Ray simulation engine, checked against the in-process oracle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedmem.config import Config
from fedmem.simulation import run_scenario

pytestmark = pytest.mark.flower


def _strip(metrics: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_flower_run_equals_the_in_process_loop(tiny_config: Callable[..., Config], strategy: str) -> None:
    # scaffold: two named arrays down ("model", "c"), two up ("model", "c_delta"), per-client files
    cfg = tiny_config(f"strategy.name={strategy}")
    flower = run_scenario(cfg.with_runtime(engine="flower"))
    oracle = run_scenario(cfg.with_runtime(engine="inprocess", cpus_per_client=1))
    # same sampling, same local training (one thread each), same aggregation order: identical numbers
    assert _strip(flower.metrics()) == _strip(oracle.metrics())
    files = {p.name for p in flower.path.iterdir()}
    assert {"config.toml", "status.json", "metrics.jsonl", "model.pt", "state.pt", "summary.json"} <= files
    summary = flower.summary()
    assert summary["engine"] == "flower"
    if strategy == "fedavg":  # SCAFFOLD's plain SGD (momentum 0) learns little in 2 tiny rounds
        assert summary["accuracy"]["global"]["mean"] > 0.3  # chance is 0.1
    s_flower = torch.load(flower.path / "state.pt")
    s_oracle = torch.load(oracle.path / "state.pt")
    assert (
        sorted(s_flower)
        == sorted(s_oracle)
        == sorted({"fedavg": ["model"], "scaffold": ["c", "model"]}[strategy])
    )
    for name, weights in s_flower.items():
        assert all(torch.equal(weights[k], s_oracle[name][k]) for k in weights)


def test_a_dead_client_process_stops_the_run_with_a_clear_error(
    tiny_config: Callable[..., Config],
) -> None:
    # A dead Ray actor stays in Flower's pool and fails every later message it is given, so most of
    # the round fails; the run must stop, not go on with silently emptied rounds.
    from fedmem.errors import FederationError
    from fedmem.federation.runner import run_flower
    from fedmem.results import RunDir
    from tests.federation.faulty_apps import crashing_app as app

    cfg = tiny_config("partition.unseen_fraction=0.0", "rounds=3")
    with pytest.raises(
        FederationError, match=r"round 1: \d of 4 clients failed to train.*worker process died"
    ):
        run_scenario(cfg, engine=lambda shipped, run: run_flower(shipped, run, client_app=app))
    (path,) = Path(cfg.runtime.output_dir).iterdir()
    assert RunDir(path).status()["status"] == "failed"
    assert not (path / "summary.json").exists()


def test_a_hung_client_counts_as_failed_after_the_round_timeout(
    tiny_config: Callable[..., Config],
) -> None:
    import time

    from fedmem.errors import FederationError
    from fedmem.federation.runner import run_flower
    from tests.federation.faulty_apps import HANG_SECONDS
    from tests.federation.faulty_apps import hanging_app as app

    cfg = tiny_config(
        "partition.unseen_fraction=0.0", "runtime.round_timeout=15.0", "runtime.max_failure_fraction=0.2"
    )
    start = time.perf_counter()
    # the hung client, and any client queued behind it on the same actor, miss the deadline
    with pytest.raises(FederationError, match=r"round 2: [12] of 4 clients failed to train.*no reply within"):
        run_scenario(cfg, engine=lambda shipped, run: run_flower(shipped, run, client_app=app))
    assert time.perf_counter() - start < 60 + HANG_SECONDS
