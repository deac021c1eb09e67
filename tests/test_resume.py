"""Checkpoints and ``fedmem resume``: a resumed run ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from fedmem import results
from fedmem.cli import main
from fedmem.config import Config
from fedmem.errors import ConfigError, FedmemError
from fedmem.federation.sessions import run_on_engine
from fedmem.jobs import Monitor, run_config
from fedmem.results import CHECKPOINT, RunDir, client_file, newest_version, stale_versions

TIMING = {"seconds", "wall_seconds"}  # the only fields a resumed run may change


class _Crash(Monitor):
    """Stops the run (as Ctrl-C does) once round ``at`` is recorded."""

    def __init__(self, at: int) -> None:
        self.at = at

    def round(self, server_round: int, record: Mapping[str, Any]) -> None:
        if server_round == self.at:
            raise KeyboardInterrupt


def _interrupted(cfg: Config, at: int) -> RunDir:
    with pytest.raises(KeyboardInterrupt):
        run_on_engine(cfg, monitor=_Crash(at))
    (path,) = [p for p in Path(cfg.runtime.output_dir).iterdir() if p.is_dir()]
    return RunDir(path)


def _untimed(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _assert_same_run(a: RunDir, b: RunDir) -> None:
    assert _untimed(a.metrics()) == _untimed(b.metrics())
    assert _untimed(a.summary()) == _untimed(b.summary())
    for name in ("state.pt", "model.pt"):
        if (a.path / name).exists() or (b.path / name).exists():
            sa, sb = torch.load(a.path / name), torch.load(b.path / name)
            assert sa.keys() == sb.keys()
            for k in sa:
                if isinstance(sa[k], dict):
                    assert all(torch.equal(sa[k][j], sb[k][j]) for j in sa[k])
                else:
                    assert torch.equal(sa[k], sb[k])


@pytest.mark.parametrize(
    "strategy",
    [
        "fedavg",  # plus seeded server noise keyed by round, and adaptive clipping's C in the state
        "scaffold",  # control variates: server state and per-client files
        "fedadam",  # server optimizer moments under server/
        "ditto",  # personal models on disk, read back by evaluation
        "ifca",  # cluster models, per-client choice
    ],
)
def test_a_resumed_run_equals_an_uninterrupted_one(
    tiny_config: Callable[..., Config], tmp_path: Path, strategy: str
) -> None:
    settings = [
        f"strategy.name={strategy}",
        "rounds=4",
        "eval_every=2",
        "runtime.engine=inprocess",
        "runtime.checkpoint_every=2",
    ]
    if strategy == "fedavg":
        settings += [
            "update.clip_norm=5.0",
            "update.noise_multiplier=0.1",
            "update.weighting='uniform'",
            "update.clipping='adaptive'",
            "update.count_noise_std=0.5",
        ]
    whole = run_on_engine(tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'whole'}'"))
    cut_cfg = tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'cut'}'")
    cut = _interrupted(cut_cfg, at=3)  # round 3 ran after the checkpoint of round 2
    assert cut.status()["status"] == "interrupted"
    assert [m["round"] for m in cut.metrics()] == [1, 2, 3]
    checkpoint = cut.checkpoint()
    assert checkpoint is not None and checkpoint.round == 2
    resumed = run_on_engine(run_config(cut.path), resume=cut.path)
    assert resumed.path == cut.path and resumed.is_complete()
    assert not (cut.path / CHECKPOINT).exists()  # a complete run keeps state.pt only
    _assert_same_run(whole, resumed)
    # the metrics file is the same bytes except round times
    assert len(cut.metrics_path.read_text().splitlines()) == 4


def test_a_run_interrupted_before_its_first_checkpoint_starts_again(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    settings = ["strategy.name=local", "rounds=3", "runtime.engine=inprocess", "runtime.checkpoint_every=5"]
    whole = run_on_engine(tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'whole'}'"))
    cut = _interrupted(tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'cut'}'"), at=2)
    assert cut.checkpoint() is None
    assert list(cut.path.glob("clients/*/local_model@*.pt"))  # written by rounds 1-2, forgotten on resume
    resumed = run_on_engine(run_config(cut.path), resume=cut.path)
    _assert_same_run(whole, resumed)


def test_resume_refuses_another_config_naming_the_key(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config("rounds=3", "runtime.engine=inprocess")
    cut = _interrupted(cfg, at=2)
    with pytest.raises(ConfigError, match=r"config key strategy\.lr \(0\.01 there, 0\.07 here\) differs"):
        run_on_engine(run_config(cut.path, ["strategy.lr=0.07"]), resume=cut.path)
    # runtime settings may differ: where and how it runs does not change the numbers
    done = run_on_engine(run_config(cut.path, ["runtime.max_failure_fraction=0.9"]), resume=cut.path)
    assert done.is_complete()
    with pytest.raises(FedmemError, match="complete already"):
        run_on_engine(run_config(cut.path), resume=cut.path)


def test_resume_refuses_a_checkpoint_of_other_code(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = _interrupted(tiny_config("rounds=3", "runtime.engine=inprocess"), at=2)
    monkeypatch.setattr("fedmem.jobs.code_version", lambda: "0.1.0+000000000000")
    wanted = r"written by fedmem 0\.1\.0\+\w+ and this is fedmem 0\.1\.0\+0+ \(the code version differs\)"
    with pytest.raises(ConfigError, match=wanted):
        run_on_engine(run_config(cut.path), resume=cut.path)
    assert cut.status()["status"] == "interrupted"  # a refusal changes nothing


def test_resume_refuses_a_checkpoint_written_under_other_library_versions(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmem.results import environment

    cut = _interrupted(tiny_config("rounds=3", "runtime.engine=inprocess"), at=2)
    written = cut.checkpoint()
    assert written is not None and written.environment == environment()
    monkeypatch.setattr("fedmem.jobs.environment", lambda: {**environment(), "torch": "9.9.9+cpu"})
    wanted = (
        rf"^cannot resume {re.escape(str(cut.path))}: its checkpoint was written under torch "
        rf"{re.escape(environment()['torch'])} and this is torch 9\.9\.9\+cpu, so the numbers would differ"
    )
    with pytest.raises(ConfigError, match=wanted):
        run_on_engine(run_config(cut.path), resume=cut.path)
    assert cut.status()["status"] == "interrupted"
    # flwr does not decide the numbers (a Flower run equals the in-process one): no refusal for it
    monkeypatch.setattr("fedmem.jobs.environment", lambda: {**environment(), "flwr": "9.9.9"})
    assert run_on_engine(run_config(cut.path), resume=cut.path).is_complete()


def test_resume_refuses_a_run_that_is_still_running(tiny_config: Callable[..., Config]) -> None:
    import socket
    import subprocess
    import sys

    cut = _interrupted(tiny_config("rounds=3", "runtime.engine=inprocess"), at=2)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        status = cut.status()
        results.atomic_write_json(
            cut.path / "status.json",
            {**status, "status": "running", "host": socket.gethostname(), "pid": other.pid},
        )
        with pytest.raises(FedmemError, match=rf"still running \(host .*, pid {other.pid}\)"):
            run_on_engine(run_config(cut.path), resume=cut.path)
    finally:
        other.kill()
        other.wait()
    # its writer gone, the run can be resumed
    assert run_on_engine(run_config(cut.path), resume=cut.path).is_complete()


def test_a_damaged_checkpoint_is_one_sentence(tiny_config: Callable[..., Config]) -> None:
    cut = _interrupted(tiny_config("rounds=3", "runtime.engine=inprocess"), at=2)
    (cut.path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(FedmemError, match=r"checkpoint\.pt is damaged .*delete it"):
        run_on_engine(run_config(cut.path), resume=cut.path)


def test_fedmem_resume_from_the_command_line(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    cut = _interrupted(tiny_config("rounds=3", "runtime.engine=inprocess"), at=2)
    result = CliRunner().invoke(main, ["resume", str(cut.path)])
    assert result.exit_code == 0, result.output
    assert f"resuming {cut.path} after round 2 of 3" in result.output
    assert cut.is_complete() and [m["round"] for m in cut.metrics()] == [1, 2, 3]
    again = CliRunner().invoke(main, ["resume", str(cut.path)])
    assert again.exit_code == 2 and "complete already" in again.output
    missing = CliRunner().invoke(main, ["resume", str(tmp_path)])
    assert missing.exit_code == 2 and "not a fedmem run directory (no config.toml)" in missing.output


def test_checkpoint_every_zero_writes_none_and_keeps_one_client_version(
    tiny_config: Callable[..., Config],
) -> None:
    settings = ["strategy.name=local", "rounds=3", "runtime.engine=inprocess", "runtime.checkpoint_every=0"]
    run = run_on_engine(tiny_config(*settings))
    assert not (run.path / CHECKPOINT).exists()
    for folder in (run.path / "clients").iterdir():
        assert [p.name for p in folder.iterdir()] == ["local_model@3.pt"]  # all three train every round


# --------------------------------------------------------------------------- client file versions


def test_stale_versions_keep_the_newest_and_the_checkpoints() -> None:
    assert stale_versions([], 4) == []
    assert stale_versions([1, 2, 3], 0) == [1, 2]  # no checkpoint: only the newest is read
    assert stale_versions([1, 2, 3, 5, 6], 4) == [1, 2, 5]  # 3 for a resume from 4, 6 to go on
    assert stale_versions([5, 6], 4) == [5]  # nothing <= 4: a resume finds no file, as then
    assert stale_versions([2, 4], 4) == [2]


def test_newest_version_reads_no_file_of_a_later_round(tmp_path: Path) -> None:
    for r in (1, 3, 7):
        results.atomic_torch_save(torch.tensor(r), client_file(tmp_path, "head", r))
    results.atomic_torch_save(torch.tensor(0), client_file(tmp_path, "head_extra", 9))
    assert newest_version(tmp_path, "head", 0) is None
    assert newest_version(tmp_path, "head", 3) == client_file(tmp_path, "head", 3)
    assert newest_version(tmp_path, "head", 6) == client_file(tmp_path, "head", 3)
    assert newest_version(tmp_path, "head", 100) == client_file(tmp_path, "head", 7)
    assert newest_version(tmp_path / "absent", "head", 100) is None


def test_metrics_are_rewound_as_written(tmp_path: Path) -> None:
    run = RunDir.create_at(tmp_path / "r", "")
    for r in range(4):
        run.append_metrics({"round": r, "failed": {10: "x", 2: "y"}})
    before = run.metrics_path.read_text().splitlines(keepends=True)
    run.rewind(2)
    assert run.metrics_path.read_text() == "".join(before[:3])
    assert json.loads(before[0])["failed"] == {"10": "x", "2": "y"}


@pytest.mark.flower
def test_a_run_resumed_on_flower_equals_the_uninterrupted_in_process_run(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    settings = ["strategy.name=scaffold", "rounds=3", "runtime.engine=inprocess"]
    whole = run_on_engine(tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'whole'}'"))
    cut = _interrupted(tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'cut'}'"), at=2)
    resumed = run_on_engine(run_config(cut.path, ["runtime.engine=flower"]), resume=cut.path)
    assert resumed.summary()["engine"] == "flower"
    a, b = _untimed(whole.summary()), _untimed(resumed.summary())
    assert {**a, "engine": "flower"} == b
    assert _untimed(whole.metrics()) == _untimed(resumed.metrics())
