"""Joining an existing Ray cluster: the address, the per-node check, and a two-node federation."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmem.config import Config, load_config
from fedmem.errors import ConfigError
from fedmem.federation.cluster import NodeFindings, _node_task, client_nodes, describe, inspect_node
from fedmem.federation.runner import backend_config, ray_address
from tests.proctree import Proc, command, is_ray_worker, processes

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------- the address


@pytest.mark.parametrize(
    "address", ["ray://10.0.0.5:10001", "10.0.0.5", "head:0", "head:65536", "local", ":6379"]
)
def test_an_address_fedmem_cannot_join_is_one_sentence_naming_the_key(address: str) -> None:
    with pytest.raises(
        ConfigError, match=r"^runtime\.ray_address = .* valid forms: '' .*'auto' .*'HOST:PORT'"
    ) as info:
        load_config("default", [f"runtime.ray_address='{address}'"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "head-1.lan:6379", "[::1]:6379"])
def test_auto_and_host_port_are_accepted(address: str) -> None:
    assert load_config("default", [f"runtime.ray_address='{address}'"]).runtime.ray_address == address


def test_a_cluster_brings_its_own_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"runtime\.num_cpus = 4 .*leave runtime\.num_cpus at 0"):
        load_config("default", ["runtime.ray_address='auto'", "runtime.num_cpus=4"])
    # this machine's CPU count does not bound a cluster's nodes
    many = (os.cpu_count() or 1) + 1
    cfg = load_config("default", ["runtime.ray_address='auto'", f"runtime.cpus_per_client={many}"])
    assert cfg.runtime.cpus_per_client == many
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # Ray's own convention, the key left empty
    assert load_config("default", [f"runtime.cpus_per_client={many}"]).runtime.cpus_per_client == many
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match=rf"runtime\.cpus_per_client = {many} is more than"):
        load_config("default", [f"runtime.cpus_per_client={many}"])


def test_ray_address_env_is_used_when_the_key_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("default")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(cfg.runtime) == ""
    assert "num_cpus" in backend_config(cfg, "/tmp/x", verbose=False)["init_args"]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ray_address(cfg.runtime) == "10.0.0.5:6379"
    # joining: only where to connect and how loud, nothing that sizes a new local Ray
    assert backend_config(cfg, "/tmp/x", verbose=False)["init_args"] == {
        "address": "10.0.0.5:6379",
        "logging_level": 40,
        "log_to_driver": False,
    }
    assert ray_address(cfg.with_runtime(ray_address="auto").runtime) == "auto"  # the key wins
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.5:10001")
    with pytest.raises(
        ConfigError, match=r"^the environment variable RAY_ADDRESS = 'ray://10\.0\.0\.5:10001' is not"
    ):
        ray_address(cfg.runtime)


# ----------------------------------------------------------------------------- the node check


def test_nodes_lacking_something_make_one_sentence_naming_each() -> None:
    findings = [
        NodeFindings(
            "10.0.0.7",
            "bbbb",
            ("the data set mnist (not found)", "write access to the output directory /r (Permission denied)"),
        ),
        NodeFindings("10.0.0.5", "aaaa"),
        NodeFindings(
            "10.0.0.6", "cccc", ("fedmem (ModuleNotFoundError: No module named 'fedmem'; install it)",)
        ),
    ]
    assert describe(findings) == (
        "2 of the 3 Ray nodes that can run clients cannot: node 10.0.0.6 (node id cccc) lacks fedmem "
        "(ModuleNotFoundError: No module named 'fedmem'; install it); node 10.0.0.7 (node id bbbb) lacks "
        "the data set mnist (not found) and write access to the output directory /r (Permission denied); "
        "every such node needs fedmem installed in the Python that runs Ray there, the data set at the same "
        "path (or a download that works there) and the output directory on a file system shared with this "
        "machine (see docs/cluster.md)."
    )
    assert describe([NodeFindings("10.0.0.5", "aaaa")]) is None
    assert describe([]) is None


def test_only_alive_nodes_with_room_for_a_client_are_checked() -> None:
    nodes = [
        {"NodeID": "a", "NodeManagerAddress": "10.0.0.5", "Alive": True, "Resources": {"CPU": 1.0}},
        {"NodeID": "b", "NodeManagerAddress": "10.0.0.6", "Alive": True, "Resources": {"CPU": 4.0}},
        {"NodeID": "c", "NodeManagerAddress": "10.0.0.7", "Alive": False, "Resources": {}},
        {"NodeID": "d", "NodeManagerAddress": "10.0.0.8", "Alive": True, "Resources": {"memory": 1e9}},
    ]
    assert client_nodes(nodes, 1) == [NodeFindings("10.0.0.5", "a"), NodeFindings("10.0.0.6", "b")]
    assert client_nodes(nodes, 2) == [NodeFindings("10.0.0.6", "b")]
    assert client_nodes(nodes, 8) == []


def test_a_node_with_everything_lacks_nothing(tmp_path: Path) -> None:
    (tmp_path / ".marker").write_text("token")
    assert (
        inspect_node("fashion_mnist", str(tmp_path / "data"), False, str(tmp_path), ".marker", "token") == []
    )
    assert [p.name for p in tmp_path.iterdir()] == [".marker"]  # the write probe leaves nothing


def test_a_node_lacking_the_data_and_the_shared_directory_says_both(tmp_path: Path) -> None:
    (tmp_path / ".marker").write_text("another driver's token")
    missing = inspect_node("mnist", str(tmp_path / "empty"), False, str(tmp_path), ".marker", "token")
    assert len(missing) == 2
    assert missing[0].startswith("the data set mnist (MNIST was not found in ")
    assert "downloading is off" in missing[0]
    assert (
        missing[1]
        == f"the output directory {tmp_path} shared with the driver (it is another directory there)"
    )
    assert inspect_node("fashion_mnist", "/nonexistent", False, str(tmp_path / "absent"), ".m", "t") == [
        f"the output directory {tmp_path / 'absent'} (it does not exist on this node)"
    ]


def test_a_node_without_fedmem_gets_the_check_and_says_so() -> None:
    # The task travels by value: a Python that cannot import fedmem still unpickles and runs it.
    import ray.cloudpickle as cloudpickle

    payload = cloudpickle.dumps(_node_task())
    code = (
        "import sys; sys.modules['fedmem'] = None\n"  # as if fedmem were not installed
        "import ray.cloudpickle as cp\n"
        "print(cp.loads(sys.stdin.buffer.read())('mnist', '/r', False, '/o', '.m', 't'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, env=env, cwd="/", check=True
    ).stdout.decode()
    assert out.startswith('["fedmem (ModuleNotFoundError: ')
    assert "install it in the Python that runs Ray there)" in out


# ----------------------------------------------------------------------------- a real two-node cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_members(groups: set[int]) -> dict[int, Proc]:
    """Processes in the given process groups."""
    return {pid: p for pid, p in processes().items() if p.group in groups}


def _daemons(groups: set[int]) -> dict[tuple[int, int], str]:
    """The cluster's own processes (GCS, raylets, agents...), not its workers: (pid, start) -> command.

    Workers come and go with jobs (an idle one may become a job's actor and end with it);
    the daemons must outlive any session that only joined the cluster.
    """
    found = {(pid, p.start): command(pid) for pid, p in _group_members(groups).items()}
    return {key: cmd for key, cmd in found.items() if cmd and not is_ray_worker(cmd)}  # '': gone meanwhile


@dataclass
class RayCluster:
    address: str
    groups: set[int]  # one process group per `ray start`: the node's processes and nothing else


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """A head (1 CPU) and a worker node (2 CPUs) on the loopback interface, ended by process group.

    Not ``ray stop``: it ends every Ray process of this user on the machine, other runs'
    included. Each ``ray start`` runs in a new session, so its daemons (GCS, raylet, agents,
    workers) share its process group and only they are ended.
    """
    ray = str(Path(sys.executable).with_name("ray"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # fedmem "installed" on both nodes: this checkout first on their Python path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    port = _free_port()
    temp_dirs = [tempfile.mkdtemp(prefix="fedmem-cluster-") for _ in range(2)]
    per_node = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes = [
        [ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         f"--ray-client-server-port={_free_port()}"],
        [ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2"],
    ]  # fmt: skip
    groups: set[int] = set()
    try:
        for command, temp_dir in zip(nodes, temp_dirs, strict=True):
            ports = [
                f"--{name}-port={_free_port()}"
                for name in ("dashboard-agent-listen", "metrics-export", "runtime-env-agent")
            ]
            proc = subprocess.Popen(
                [*command, *per_node, *ports, f"--temp-dir={temp_dir}"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            groups.add(proc.pid)
            output, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, output.decode()
        yield RayCluster(f"127.0.0.1:{port}", groups)
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _group_members(groups) and time.monotonic() < deadline:
            time.sleep(0.1)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert _group_members(groups) == {}


def _strip(metrics: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def _recording_app() -> object:
    """fedmem's ClientApp, except that each training client also notes the Ray node it ran on."""
    import ray
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedmem.client import parse_config
    from fedmem.federation import client_app as real
    from fedmem.federation.records import read_request

    app = ClientApp()
    app.query()(real.query)
    app.evaluate()(real.evaluate)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config_json, _ = read_request(msg.content)
        nodes = Path(parse_config(config_json).runtime.run_dir) / "nodes"
        nodes.mkdir(exist_ok=True)
        (nodes / ray.get_runtime_context().get_node_id()).touch()
        return real.train(msg, context)

    return app


@pytest.mark.slow
@pytest.mark.flower
def test_a_federation_on_a_two_node_cluster_equals_the_in_process_loop(
    cluster: RayCluster, tiny_config: Callable[..., Config]
) -> None:
    from fedmem.federation.sessions import run_on_engine, session_for

    before = _daemons(cluster.groups)
    assert sum("raylet" in cmd for cmd in before.values()) == 2 and any(
        "gcs_server" in c for c in before.values()
    )
    cfg = tiny_config(f"runtime.ray_address='{cluster.address}'")
    run = run_on_engine(cfg, session=session_for(cfg, client_app=_recording_app()))
    oracle = run_on_engine(cfg.with_runtime(engine="inprocess", ray_address=""))
    # same sampling, same local training (one thread per actor), same aggregation order
    assert _strip(run.metrics()) == _strip(oracle.metrics())
    assert run.summary()["accuracy"]["global"]["mean"] > 0.3  # chance is 0.1
    # Flower's pool has one actor per CPU (1 + 2): clients trained on both nodes
    assert len(list((run.path / "nodes").iterdir())) == 2
    # the session ended by disconnecting: the cluster's own processes all live on
    assert _daemons(cluster.groups) == before


@pytest.mark.slow
@pytest.mark.flower
def test_a_cluster_with_no_node_big_enough_stops_before_any_round(
    cluster: RayCluster, tiny_config: Callable[..., Config]
) -> None:
    from fedmem.errors import FederationError
    from fedmem.federation.sessions import run_on_engine, session_for

    cfg = tiny_config(f"runtime.ray_address='{cluster.address}'", "runtime.cpus_per_client=3")
    with pytest.raises(FederationError) as info:
        run_on_engine(cfg, session=session_for(cfg))
    message = str(info.value)
    assert message.startswith("no alive node of the Ray cluster has the 3 CPUs runtime.cpus_per_client asks")
    assert sorted(part.split(": ")[1] for part in message.split("(")[1].split(")")[0].split(", ")) == [
        "1 CPU",
        "2 CPUs",
    ]
    assert not Path(cfg.runtime.output_dir).exists()  # stopped before any run directory
