"""Faults a run survives (recorded in metrics.jsonl) or stops on within seconds, with one sentence.

Client exceptions that stop a run and hung clients are covered in ``test_flower.py``, Ctrl-C of a
real ``fedmem run`` there too; recorded exceptions and too many failures in ``tests/test_simulation.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedmem.config import Config
from fedmem.results import RunDir
from fedmem.sweep import run_scenario, session_for


def _survived(run: RunDir, failed_round: int) -> dict[str, str]:
    """Check ``run`` completed with every client back after ``failed_round``; that round's failures."""
    assert run.status()["status"] == "complete" and (run.path / "summary.json").is_file()
    lines = run.metrics()
    cfg_rounds = len(lines)
    everyone = [0, 1, 2, 3]
    for line in lines:
        assert line["sampled"] == everyone
        assert line["eval_failed"] == {}  # evaluation comes after the round's failures: all clients answer
        assert sorted(line["clients"]) == ["0", "1", "2", "3"]
        if line["round"] != failed_round:
            assert line["failed"] == {}, line["round"]
    assert run.summary()["accuracy"]["global"]["clients"] == 4 and cfg_rounds == 3
    return dict(lines[failed_round - 1]["failed"])


@pytest.mark.flower
@pytest.mark.parametrize("fault", ["crashing_app", "killed_app"])
def test_a_dead_worker_is_replaced_and_the_run_goes_on(
    tiny_config: Callable[..., Config], fault: str
) -> None:
    # crashing: os._exit(1) in the actor; killed: SIGKILL of the actor's own process. Flower 1.41 kept
    # the dead actor in its pool, so every later message on it failed and the run stopped.
    from tests.federation import faulty_apps

    cfg = tiny_config("partition.unseen_fraction=0.0", "rounds=3")
    run = run_scenario(cfg, session=session_for(cfg, client_app=getattr(faulty_apps, fault)))
    failed = _survived(run, failed_round=1)
    assert list(failed) == ["0"]  # only the message the dying worker was running
    assert "worker process died" in failed["0"]
