"""Faults a run survives (recorded in metrics.jsonl) or stops on within seconds, with one sentence.

Elsewhere: a client exception that stops a run and a hung client in ``test_flower.py``; too many
failures in one round, in process, in ``tests/test_simulation.py``. The table of faults and their
outcomes is in docs/architecture.md (*Faults*).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from fedmem.config import Config
from fedmem.federation.sessions import run_on_engine, session_for
from fedmem.jobs import run_config
from fedmem.results import RunDir
from fedmem.simulation import ClientFailure, InProcessExecutor
from fedmem.updates import Arrays


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
        # the actor's process ends (os._exit, as a segfault) or is killed (SIGKILL, as the OOM killer).
        # Flower 1.41 keeps the dead actor in its pool; without ray_backend's replacement, round 1
        # failed 3 of 4 clients here and the run stopped (measured)
        pytest.param("crashing_app", "worker process died", id="crashing"),
        pytest.param("killed_app", "worker process died", id="killed"),
    ],
)
def test_a_failing_client_is_recorded_for_its_round_and_the_run_goes_on(
    tiny_config: Callable[..., Config], fault: str, reason: str
) -> None:
    from tests.federation import faulty_apps

    cfg = tiny_config("partition.unseen_fraction=0.0")
    run = run_on_engine(cfg, session=session_for(cfg, client_app=getattr(faulty_apps, fault)))
    failed = _survived(run, rounds=2, failed_round=1)
    assert list(failed) == ["0"]  # only client 0's message, also when its worker died under it
    assert re.search(reason, failed["0"]), failed["0"]


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (a whole tiny run needs about 1 MiB), unmounted afterwards."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path) -> None:
    """Fill the file system holding ``disk`` to the last byte."""
    with open(disk / "filler", "ab", buffering=0) as fh:
        for size in (1 << 20, 4096, 1):
            try:
                while fh.write(b"\0" * size):
                    pass
            except OSError:
                pass


def _whole_lines(run: RunDir) -> list[dict[str, object]]:
    """Every line of metrics.jsonl, checking none was cut."""
    text = run.metrics_path.read_text() if run.metrics_path.exists() else ""
    assert text == "" or text.endswith("\n")
    return run.metrics()  # raises on a damaged line


@pytest.mark.parametrize(
    ("method", "file"),
    [
        ("append_metrics", "metrics.jsonl"),
        ("save_checkpoint", "checkpoint.pt"),
        ("save_state", "model.pt"),
        ("complete", "summary.json"),
    ],
)
def test_a_full_disk_fails_the_run_with_one_sentence_and_no_debris(
    tiny_config: Callable[..., Config],
    small_disk: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    file: str,
) -> None:
    # The disk fills up just before the run writes its first metrics line, its model, or its summary.
    import json

    from fedmem.errors import FedmemError

    original = getattr(RunDir, method)

    def fill_then(self: RunDir, *args: object) -> object:
        _fill(small_disk)
        return original(self, *args)

    monkeypatch.setattr(RunDir, method, fill_then)
    cfg = tiny_config(f"runtime.output_dir='{small_disk}'").with_runtime(engine="inprocess")
    sentence = rf"^cannot write {small_disk}/\S+/{file} \(No space left on device\); free space or choose"
    with pytest.raises(FedmemError, match=sentence):
        run_on_engine(cfg)
    (path,) = [p for p in small_disk.iterdir() if p.is_dir()]
    status = json.loads((path / "status.json").read_text())
    assert status["status"] == "failed" and "\n" not in status["error"]
    assert re.match(sentence, status["error"])
    assert not (path / "summary.json").exists()
    lines = {"append_metrics": 0, "save_checkpoint": 1}.get(method, cfg.rounds)
    assert len(_whole_lines(RunDir(path))) == lines
    assert not [p.name for p in path.rglob("*") if p.name.endswith(".tmp")]
    # space freed, the failed run is resumed to the end
    monkeypatch.setattr(RunDir, method, original)
    (small_disk / "filler").unlink()
    assert run_on_engine(run_config(path), resume=path).is_complete()


def test_a_disk_too_full_for_any_status_is_one_sentence_from_the_cli(small_disk: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import TINY

    _fill(small_disk)
    sets = [a for item in TINY for a in ("--set", item)]
    done = subprocess.run(
        [sys.executable, "-m", "fedmem.cli", "run", "--engine", "inprocess", "--out", str(small_disk), *sets],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert re.match(rf"^error: cannot write {small_disk}/\S+ \(No space left on device\); free space", line)
    assert [p.name for p in small_disk.iterdir()] == ["filler"]  # no run directory without a status


# --------------------------------------------------------------------------- concurrent runs


@pytest.mark.parametrize(
    "engine",
    # Two Flower runs at once start two Ray clusters side by side (measured: both complete, 94 s on
    # the loaded 2-core machine), hence slow; the run directories are the same code on both engines.
    ["inprocess", pytest.param("flower", marks=[pytest.mark.flower, pytest.mark.slow])],
)
def test_two_runs_into_one_output_directory_complete_side_by_side(tmp_path: Path, engine: str) -> None:
    import subprocess
    import sys

    from tests.conftest import TINY

    sets = [a for item in TINY for a in ("--set", item)]
    command = [sys.executable, "-m", "fedmem.cli", "run", "--engine", engine, "--out", str(tmp_path), *sets]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    first, second = (RunDir(p) for p in sorted(tmp_path.iterdir()))
    # the same scenario and seed: identical numbers, so neither run's files were touched by the other
    for run in (first, second):
        assert run.is_complete()
        assert not [p.name for p in run.path.rglob("*") if p.name.endswith(".tmp")]
    strip = ("seconds", "wall_seconds")
    assert [{k: v for k, v in m.items() if k not in strip} for m in first.metrics()] == [
        {k: v for k, v in m.items() if k not in strip} for m in second.metrics()
    ]
    assert {k: v for k, v in first.summary().items() if k not in strip} == {
        k: v for k, v in second.summary().items() if k not in strip
    }


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.flower
def test_ctrl_c_mid_round_leaves_an_interrupted_run_and_no_ray_process(tmp_path: Path) -> None:
    # Every process the run started is recorded before the signal, to check that none survives it.
    import glob
    import json
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import TINY
    from tests.proctree import command, descendants, is_ray_worker, still_running

    temp_dirs = set(glob.glob("/tmp/fedmem-ray-*"))  # the run's own Ray temp dir must go too
    # far more rounds than can end before the signal, however fast the machine
    sets = [a for item in [*TINY, "rounds=100000", "eval_every=100000"] for a in ("--set", item)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmem.cli", "run", "--engine", "flower", "--out", str(tmp_path), *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180

        def mid_round() -> dict[int, str]:
            """The run's processes once one round has ended and its actors train the next; {} before."""
            if not list(tmp_path.glob("*/metrics.jsonl")):
                return {}
            commands = {pid: command(pid) for pid in descendants(proc.pid)}
            return commands if any(is_ray_worker(c) for c in commands.values()) else {}

        while not mid_round() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        started = descendants(proc.pid)
        if not mid_round():  # say what was there instead, and what the run printed
            seen = {pid: command(pid) for pid in started}
            state = "still running" if proc.poll() is None else f"ended with exit status {proc.returncode}"
            proc.kill()
            pytest.fail(
                f"no Ray worker mid-round within 180 s (the run {state}); its processes {seen}; "
                f"its output: {proc.communicate()[0]}"
            )
        ours = set(glob.glob("/tmp/fedmem-ray-*")) - temp_dirs
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert took < 10, f"{took:.1f} s after Ctrl-C"
    assert "Traceback" not in output and "interrupted" in output
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert not (run_dir / "summary.json").exists()
    assert still_running(started) == []
    assert ours and not [d for d in ours if Path(d).exists()]
    # resumable: its checkpoint (round 1 at least) passes every check of fedmem resume
    from fedmem.jobs import resume_point, ship

    run = RunDir(run_dir)
    checkpoint = resume_point(run, ship(run_config(run_dir), run))
    assert checkpoint is not None and checkpoint.round >= 1


# --------------------------------------------------------------------------- a short summary


class _EvalFailingExecutor(InProcessExecutor):
    """Client 1 fails to evaluate in the last round."""

    def evaluate(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Mapping[str, float] | ClientFailure]:
        last = server_round == self.cfg.rounds
        out = super().evaluate(server_round, [p for p in pids if p != 1 or not last], arrays)
        if last:
            out[1] = ClientFailure(1, "RuntimeError: evaluation broke")
        return out


def test_a_summary_over_fewer_clients_than_configured_names_the_missing_ones(
    tiny_config: Callable[..., Config],
) -> None:
    from fedmem.jobs import run_scenario as run_with

    cfg = tiny_config("partition.unseen_fraction=0.0")
    run = run_with(cfg, lambda c, n, body: body(_EvalFailingExecutor))
    summary = run.summary()
    assert summary["eval_failed"] == {"1": "RuntimeError: evaluation broke"}
    assert summary["accuracy"]["global"]["clients"] == 3  # of 4
    assert run.metrics()[0]["eval_failed"] == {}


def test_the_dead_actor_backend_is_installed_only_for_the_flower_it_was_written_against(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flwr
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedmem.federation import ray_backend

    stock = raybackend.RayBackend
    assert ray_backend.supported(flwr.__version__)  # the pinned Flower: a failing check means re-reading it
    with ray_backend.replacing_dead_actors() as installed:
        assert installed and raybackend.RayBackend is ray_backend.ReplacingRayBackend
    assert raybackend.RayBackend is stock
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with ray_backend.replacing_dead_actors() as installed:
        assert not installed and raybackend.RayBackend is stock
