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


def _survived(run: RunDir, rounds: int, failed_round: int) -> dict[str, str]:
    """Check ``run`` completed with every client back after ``failed_round``; that round's failures."""
    assert run.status()["status"] == "complete" and (run.path / "summary.json").is_file()
    lines = run.metrics()
    assert [line["round"] for line in lines] == list(range(1, rounds + 1))
    for line in lines:
        assert line["sampled"] == [0, 1, 2, 3]
        assert line["eval_failed"] == {}  # evaluation comes after the round's failures: all clients answer
        assert sorted(line["clients"]) == ["0", "1", "2", "3"]
        if line["round"] != failed_round:
            assert line["failed"] == {}, line["round"]
    assert run.summary()["accuracy"]["global"]["clients"] == 4
    return dict(lines[failed_round - 1]["failed"])


@pytest.mark.flower
@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        # the client's own exception, whole
        pytest.param(
            "raising_app",
            "^RuntimeError: boom in client 0: a message that must reach the user whole$",
            id="raising",
        ),
        # train_client refuses a non-finite upload (here: trained from a NaN model)
        pytest.param(
            "nan_app",
            r"^FederationError: client 0 produced non-finite values in model/\S+ at round 1; ",
            id="nan",
        ),
        # the actor's process ends (os._exit, as a segfault) or is killed (SIGKILL, as the OOM killer):
        # Flower 1.41 kept the dead actor in its pool, so every later message on it failed
        pytest.param("crashing_app", "worker process died", id="crashing"),
        pytest.param("killed_app", "worker process died", id="killed"),
    ],
)
def test_a_failing_client_is_recorded_for_its_round_and_the_run_goes_on(
    tiny_config: Callable[..., Config], fault: str, reason: str
) -> None:
    import re

    from tests.federation import faulty_apps

    cfg = tiny_config("partition.unseen_fraction=0.0")
    run = run_scenario(cfg, session=session_for(cfg, client_app=getattr(faulty_apps, fault)))
    failed = _survived(run, rounds=2, failed_round=1)
    assert list(failed) == ["0"]  # only client 0's message, also when its worker died under it
    assert re.search(reason, failed["0"]), failed["0"]
