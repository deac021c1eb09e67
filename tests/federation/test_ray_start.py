"""Starting Ray in the background and stopping it: tasks run, failures read well, nothing is left."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from fedmem.errors import FederationError

pytestmark = pytest.mark.flower

ray = pytest.importorskip("ray")

from fedmem.federation.ray_start import start_ray, stop_ray  # noqa: E402 (after the importorskip)
from tests.proctree import Proc, descendants, still_running  # noqa: E402


@pytest.fixture(autouse=True)
def baseline() -> dict[int, Proc]:
    """Descendants this test process had before the test (other tests may have left some)."""
    return ray_processes()


@pytest.fixture
def init_args() -> Iterator[dict[str, Any]]:
    # Ray's unix socket paths must stay short: a temp dir of its own, not deep under tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="fedmem-ray-test-")
    yield {
        "num_cpus": 2,
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": 40,
        "_temp_dir": temp_dir,
    }
    stop_ray()  # whatever a test left running
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_processes() -> dict[int, Proc]:
    """This test process's descendants."""
    return descendants(os.getpid())


def new_processes(baseline: dict[int, Proc]) -> dict[int, Proc]:
    # compared by start time: a worker retitles itself, a reused pid is another process
    return {
        pid: p for pid, p in ray_processes().items() if pid not in baseline or baseline[pid].start != p.start
    }


@pytest.mark.parametrize("lean", [True, False])
def test_start_run_a_task_and_stop_leaves_no_ray_process(
    init_args: dict[str, Any], baseline: dict[int, Proc], lean: bool
) -> None:
    handle = start_ray(init_args, preload=("wave", "torch"), threads_per_worker=1, lean=lean)
    handle.wait(timeout=120)
    assert handle.done()
    assert handle.lean is lean
    assert handle.seconds is not None and handle.seconds > 0

    @ray.remote(num_cpus=1)
    def probe() -> tuple[int, bool, int]:
        preloaded = "wave" in sys.modules and "torch" in sys.modules  # Ray itself imports neither
        import torch

        return os.getpid(), preloaded, torch.get_num_threads()

    @ray.remote(num_cpus=1)
    class Actor:
        def pid(self) -> int:
            return os.getpid()

    _, preloaded, threads = ray.get(probe.remote(), timeout=60)
    actors = [Actor.remote() for _ in range(2)]  # type: ignore[attr-defined]
    actor_pids = ray.get([a.pid.remote() for a in actors], timeout=60)
    assert preloaded
    assert threads == 1  # torch was imported before Ray set OMP_NUM_THREADS for the task
    processes = new_processes(baseline)
    # (The task's worker may be gone already: Ray ends idle workers beyond one per CPU.)
    assert set(actor_pids) <= set(processes)
    assert len(processes) >= 5  # GCS, raylet, its agents, workers

    stop_ray()

    assert not ray.is_initialized()
    assert still_running(processes) == []
    stop_ray()  # idempotent
    assert new_processes(baseline) == {}


def test_stop_after_ray_was_shut_down_elsewhere_still_waits_for_the_processes(
    init_args: dict[str, Any], baseline: dict[int, Proc]
) -> None:
    start_ray(init_args).wait(timeout=120)

    @ray.remote(num_cpus=1)
    class Actor:
        def pid(self) -> int:
            return os.getpid()

    actors = [Actor.remote() for _ in range(2)]  # type: ignore[attr-defined]
    ray.get([a.pid.remote() for a in actors], timeout=60)
    processes = new_processes(baseline)
    ray.shutdown()  # as Flower's backend does when its run ends

    stop_ray()

    assert still_running(processes) == []


def test_a_failed_start_raises_one_sentence_and_stop_still_works(
    init_args: dict[str, Any], baseline: dict[int, Proc]
) -> None:
    handle = start_ray({**init_args, "no_such_argument": 1})

    with pytest.raises(FederationError, match=r"^Ray could not start \(.*no_such_argument.*\); ") as info:
        handle.wait(timeout=120)

    assert "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, Exception)
    stop_ray()
    assert not ray.is_initialized()
    assert new_processes(baseline) == {}


def test_preload_needs_the_thread_count() -> None:
    with pytest.raises(ValueError, match="threads_per_worker"):
        start_ray({"num_cpus": 1}, preload=("wave",))
    assert not ray.is_initialized()


def test_stop_without_a_start_does_nothing() -> None:
    assert not ray.is_initialized()
    stop_ray()
    stop_ray()
    assert not ray.is_initialized()


def test_joining_a_cluster_takes_no_preload_and_no_lean_start() -> None:
    with pytest.raises(ValueError, match="not a joined cluster's"):
        start_ray({"address": "10.0.0.5:6379"}, preload=("wave",), threads_per_worker=1)
    assert not ray.is_initialized()


def test_a_joined_clusters_processes_are_never_counted_as_this_process_session() -> None:
    # ray.init(address=...) leaves a node object that names the cluster's session dir; matching
    # processes by it would end the cluster's raylet and workers on this machine.
    from types import SimpleNamespace

    from fedmem.federation.ray_start import RayStart, _session_of

    joined = SimpleNamespace(head=False, all_processes={}, get_session_dir_path=lambda: "/tmp/ray/session_x")
    assert _session_of(joined) is None
    started = SimpleNamespace(
        head=True,
        all_processes={"raylet": [SimpleNamespace(process=SimpleNamespace(pid=12))]},
        get_session_dir_path=lambda: "/tmp/ray/session_y",
    )
    session = _session_of(started)
    assert session is not None and session.raylet_pid == 12 and session.session_dir == "/tmp/ray/session_y"
    assert RayStart({"address": "auto"}, lean=False).joins_cluster
    assert not RayStart({"num_cpus": 2}, lean=True).joins_cluster


def test_joining_an_address_where_nothing_answers_fails_at_once_in_one_sentence(
    baseline: dict[int, Proc],
) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handle = start_ray({"address": f"127.0.0.1:{port}", "logging_level": 40})

    with pytest.raises(
        FederationError, match=rf"^could not join the Ray cluster at 127\.0\.0\.1:{port} \(Conn"
    ):
        handle.wait(timeout=30)

    stop_ray()
    assert not ray.is_initialized()
    assert new_processes(baseline) == {}
