"""End-to-end through Flower's Ray simulation engine, checked against the in-process oracle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedmem.config import Config
from fedmem.federation.sessions import run_on_engine, session_for

pytestmark = pytest.mark.flower


def _strip(metrics: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_flower_run_equals_the_in_process_loop(tiny_config: Callable[..., Config], strategy: str) -> None:
    # scaffold: two named arrays down ("model", "c"), two up ("model", "c_delta"), per-client files
    cfg = tiny_config(f"strategy.name={strategy}")
    flower = run_on_engine(cfg.with_runtime(engine="flower"))
    oracle = run_on_engine(cfg.with_runtime(engine="inprocess", cpus_per_client=1))
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


def test_a_hung_client_counts_as_failed_after_the_round_timeout(
    tiny_config: Callable[..., Config],
) -> None:
    import time

    from fedmem.errors import FederationError
    from tests.federation.faulty_apps import HANG_SECONDS
    from tests.federation.faulty_apps import hanging_app as app

    cfg = tiny_config(
        "partition.unseen_fraction=0.0", "runtime.round_timeout=15.0", "runtime.max_failure_fraction=0.2"
    )
    start = time.perf_counter()
    # the hung client, and any client queued behind it on the same actor, miss the deadline
    with pytest.raises(FederationError, match=r"round 2: [12] of 4 clients failed to train.*no reply within"):
        run_on_engine(cfg, session=session_for(cfg, client_app=app))
    assert time.perf_counter() - start < 60 + HANG_SECONDS


def test_a_client_exception_reaches_the_user_whole(tiny_config: Callable[..., Config]) -> None:
    from fedmem.errors import FederationError
    from fedmem.results import RunDir
    from tests.federation.faulty_apps import raising_app as app

    cfg = tiny_config("partition.unseen_fraction=0.0", "runtime.max_failure_fraction=0.2")
    reason = "RuntimeError: boom in client 0: a message that must reach the user whole"
    with pytest.raises(FederationError, match=f"first error: {reason}$"):
        run_on_engine(cfg, session=session_for(cfg, client_app=app))
    (path,) = Path(cfg.runtime.output_dir).iterdir()
    assert RunDir(path).status()["error"].endswith(f"first error: {reason}")


def test_a_flower_sweep_gives_each_federation_its_in_process_run(tmp_path: Path) -> None:
    from fedmem.sweep import SweepSpec, run_sweep
    from tests.conftest import TINY

    spec = SweepSpec("default", ("fedavg", "scaffold"), (0, 1), tuple(TINY))
    _, feds, outcomes = run_sweep(spec, extra=[f"runtime.output_dir='{tmp_path}'", "runtime.engine='flower'"])
    assert [o.status for o in outcomes] == ["complete"] * 4
    for fed, outcome in zip(feds, outcomes, strict=True):
        oracle = run_on_engine(fed.cfg.with_runtime(engine="inprocess"))
        assert _strip(outcome.run.metrics()) == _strip(oracle.metrics())


def test_an_audit_over_flower_scores_exactly_as_the_in_process_oracle(
    tiny_config: Callable[..., Config],
) -> None:
    # the audit's third request (evaluate.scores) carries per-example arrays back through Flower
    import numpy as np

    from fedmem.audit import run_audit
    from fedmem.results import RunDir

    cfg = tiny_config(
        "audit.shadows=4", "audit.subsamples=2", "audit.references=50", "audit.canaries_per_repetition=1"
    )
    flower, found = run_audit(cfg.with_runtime(engine="flower"))
    oracle, expected = run_audit(cfg.with_runtime(engine="inprocess", cpus_per_client=1))
    for name in ("target", "shadow-002", "subsample-001"):
        got, want = RunDir(flower / name).scores(), RunDir(oracle / name).scores()
        assert sorted(got) == sorted(want)
        for pid in want:
            for label, arrays in want[pid].items():
                for key, values in arrays.items():
                    assert np.array_equal(got[pid][label][key], values), (name, pid, label, key)
    assert found.leakage == expected.leakage


def test_a_text_audit_over_flower_matches_the_in_process_oracle(tmp_path: Path) -> None:
    # token windows, a recurrent model, kNN-Per over hidden states and Secret-Sharer canaries with
    # exact ranks: everything that is new for text crosses Flower and comes back bit for bit
    import numpy as np

    from fedmem.audit import run_audit
    from fedmem.config import load_config
    from fedmem.results import RunDir

    cfg = load_config(
        "text_canaries",
        [
            "rounds=1",
            "eval_every=1",
            "data.seq_len=40",
            "partition.num_clients=4",
            "partition.unseen_fraction=0.25",
            "model.embedding_dim=16",
            "strategy.local_steps=2",
            "memory.capacity=2000",
            "memory.k_grid=[3]",
            "audit.references=200",
            "audit.canaries_per_repetition=1",
            "audit.canary_format='the random number is {}{}{}{}'",
            f"runtime.output_dir='{tmp_path}'",
        ],
    )
    flower, found = run_audit(cfg.with_runtime(engine="flower"))
    oracle, expected = run_audit(cfg.with_runtime(engine="inprocess", cpus_per_client=1))
    got, want = RunDir(flower / "target").scores(), RunDir(oracle / "target").scores()
    assert sorted(got) == sorted(want)
    for pid in want:
        for label, arrays in want[pid].items():
            assert "canary/rank_exact" in arrays, (pid, label)  # every predictor here can be stepped
            for key, values in arrays.items():
                assert np.array_equal(got[pid][label][key], values), (pid, label, key)
    assert found.leakage == expected.leakage
    assert found.exact and any("exposure_exact_r64" in r for r in found.per_client)
