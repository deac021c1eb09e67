from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedmem.config import Config
from fedmem.errors import FederationError, FedmemError
from fedmem.jobs import run_scenario
from fedmem.privacy import sample_clients
from fedmem.results import RunDir
from fedmem.simulation import (
    Body,
    ClientFailure,
    Executor,
    InProcessExecutor,
    client_stats,
)
from fedmem.strategy import Update
from fedmem.updates import Arrays


def test_client_stats_by_hand() -> None:
    stats = client_stats([0.5, 1.0], [1, 3])
    assert stats == {"mean": 0.75, "weighted_mean": 0.875, "p10": 0.55, "clients": 2}


def test_sampling_is_seeded_per_round_and_sized_by_fraction() -> None:
    seen = [0, 2, 3, 5, 7, 8, 9, 11]
    a = sample_clients(0, 3, seen, 0.5)
    assert a == sample_clients(0, 3, seen, 0.5)
    assert len(a) == 4 and set(a) <= set(seen) and a == sorted(a)
    draws = {tuple(sample_clients(0, r, seen, 0.5)) for r in range(1, 20)}
    assert len(draws) > 5  # rounds draw different subsets
    assert sample_clients(0, 1, seen, 1.0) == seen
    assert len(sample_clients(0, 1, seen, 0.01)) == 1


def _run(cfg: Config) -> RunDir:
    from fedmem.federation.sessions import run_on_engine as run

    return run(cfg.with_runtime(engine="inprocess"))


def session_of(make: Callable[[Config], Executor]) -> Callable[[Config, int, Body], None]:
    """A session whose federations use executors built by ``make``."""
    return lambda cfg, num_nodes, body: body(make)


def test_in_process_run_writes_a_complete_run_directory(tiny_config: Callable[..., Config]) -> None:
    run = _run(tiny_config())
    files = {p.name for p in run.path.iterdir()}
    assert {"config.toml", "status.json", "metrics.jsonl", "model.pt", "summary.json"} <= files
    assert not [p for p in run.path.rglob("*.tmp")]
    lines = run.metrics()
    assert [m["round"] for m in lines] == [1, 2]
    summary = run.summary()
    assert set(summary["accuracy"]) == {"global", "finetune", "knn"}
    assert set(summary["unseen_accuracy"]) == {"global", "finetune", "knn"}
    assert summary["accuracy"]["global"]["clients"] == 3 and summary["unseen_accuracy"]["knn"]["clients"] == 1
    # the test-tuned oracle is reported separately, only for kNN-Per, and never below the honest figure
    assert set(summary["oracle_accuracy"]) == {"knn"} and set(summary["unseen_oracle_accuracy"]) == {"knn"}
    assert summary["oracle_accuracy"]["knn"]["mean"] >= summary["accuracy"]["knn"]["mean"]
    for stats in summary["accuracy"].values():
        assert set(stats) == {"mean", "weighted_mean", "p10", "clients"}
        assert stats["p10"] <= stats["mean"] <= 1.0
    # every client (seen or not) was evaluated, with kNN-Per's choices recorded
    clients = lines[-1]["clients"]
    assert sorted(clients) == ["0", "1", "2", "3"]
    assert all(c["knn/lambda"] in (0.0, 0.5, 1.0) and c["knn/k"] in (3.0, 5.0) for c in clients.values())
    # 1,200 images split over 4 clients, 2 rounds: well above chance (10 %) after personalization
    assert summary["accuracy"]["knn"]["mean"] > 0.4
    # the versions the numbers came from, as this process has them
    import faiss
    import numpy as np
    import torch

    from fedmem.results import code_version

    env = summary["environment"]
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["faiss-cpu"] == faiss.__version__ and env["fedmem"] == code_version()


def test_zero_rounds_evaluates_the_initial_model_once(tiny_config: Callable[..., Config]) -> None:
    import torch

    from fedmem.client import initial_weights

    cfg = tiny_config("rounds=0")
    run = _run(cfg)
    (line,) = run.metrics()
    assert line["round"] == 0 and "train_loss" not in line and "sampled" not in line
    assert run.summary()["accuracy"]["global"]["mean"] < 0.3  # untrained: about chance (10 %)
    saved = torch.load(run.path / "model.pt")
    assert all(torch.equal(saved[k], torch.from_numpy(v)) for k, v in initial_weights(cfg).items())


def test_same_seed_same_metrics_other_seed_other_metrics(tiny_config: Callable[..., Config]) -> None:
    def metrics(cfg: Config) -> list[dict[str, object]]:
        return [{k: v for k, v in m.items() if k != "seconds"} for m in _run(cfg).metrics()]

    first = metrics(tiny_config())
    assert metrics(tiny_config()) == first
    assert metrics(tiny_config("seed=1")) != first


class FailingExecutor(InProcessExecutor):
    """Clients in ``bad`` raise when asked to train."""

    def __init__(self, cfg: Config, bad: set[int]) -> None:
        super().__init__(cfg)
        self.bad = bad

    def train(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Update | ClientFailure]:
        out = super().train(server_round, [p for p in pids if p not in self.bad], arrays)
        out.update({p: ClientFailure(p, "RuntimeError: boom") for p in pids if p in self.bad})
        return out


def test_some_failures_are_recorded_too_many_stop_the_run(tiny_config: Callable[..., Config]) -> None:
    from fedmem.client import federation

    cfg = tiny_config("runtime.max_failure_fraction=0.4")
    seen = list(federation(cfg).seen)
    run = run_scenario(cfg, session_of(lambda c: FailingExecutor(c, {seen[0]})))
    assert run.metrics()[0]["failed"] == {str(seen[0]): "RuntimeError: boom"}

    with pytest.raises(
        FederationError, match=r"round 1: 2 of 3 clients failed to train.*max_failure_fraction"
    ):
        run_scenario(cfg, session_of(lambda c: FailingExecutor(c, set(seen[:2]))))
    failed = [p for p in Path(cfg.runtime.output_dir).iterdir() if p != run.path]
    assert len(failed) == 1
    status = json.loads((failed[0] / "status.json").read_text())
    assert status["status"] == "failed" and "boom" in status["error"] and "\n" not in status["error"]
    assert "Traceback" in (failed[0] / "traceback.txt").read_text()
    assert not (failed[0] / "summary.json").exists()
    with pytest.raises(FedmemError, match="did not complete"):
        RunDir(failed[0]).summary()


class InterruptingExecutor(InProcessExecutor):
    def train(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Update | ClientFailure]:
        raise KeyboardInterrupt


def test_interrupted_run_is_marked(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        run_scenario(cfg, session_of(InterruptingExecutor))
    (path,) = Path(cfg.runtime.output_dir).iterdir()
    assert RunDir(path).status()["status"] == "interrupted"


def test_bad_data_leaves_no_run_directory(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = tiny_config("data.dataset=mnist", f"data.root='{tmp_path / 'empty'}'", "data.download=false")
    with pytest.raises(FedmemError, match="MNIST"):
        _run(cfg)
    assert not Path(cfg.runtime.output_dir).exists()


def test_local_strategy_personal_models_live_in_the_run(tiny_config: Callable[..., Config]) -> None:
    run = _run(tiny_config("strategy.name=local"))
    models = sorted(p.parent.name for p in run.path.glob("clients/*/local_model@*.pt"))
    assert len(models) == 3  # the three training clients, one version each; the unseen one never trained
    summary = run.summary()
    assert set(summary["accuracy"]) == {"local", "finetune", "knn"}


def _weights_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


class BrokenExecutor(InProcessExecutor):
    def evaluate(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Mapping[str, float] | ClientFailure]:
        raise ZeroDivisionError("a bug in the engine")


def test_an_unexpected_error_is_one_sentence_with_the_traceback_on_disk(
    tiny_config: Callable[..., Config],
) -> None:
    from fedmem.errors import RunFailedError

    cfg = tiny_config()
    with pytest.raises(
        RunFailedError, match=r"^run failed: ZeroDivisionError: a bug in the engine \(traceback in "
    ):
        run_scenario(cfg, session_of(BrokenExecutor))
    (path,) = Path(cfg.runtime.output_dir).iterdir()
    status = RunDir(path).status()
    assert status["status"] == "failed" and status["error"] == "ZeroDivisionError: a bug in the engine"
    assert "ZeroDivisionError" in (path / "traceback.txt").read_text()
    assert not (path / "summary.json").exists()
