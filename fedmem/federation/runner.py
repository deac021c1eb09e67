"""Launch a run on Flower's Ray simulation engine, in this process.

``flwr.simulation.run_simulation`` is the fastest launch on one machine (DESIGN.md §3);
it returns nothing, so the ServerApp built here keeps the loop's result (or
its exception) for the caller. Everything Flower-version-specific about
launching lives in this file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from typing import Any

from fedmem.config import Config
from fedmem.results import RunDir
from fedmem.simulation import Progress, run_federation
from fedmem.updates import Arrays

# Read by Flower and Ray at import / init time; set before either is imported.
_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def backend_config(cfg: Config, temp_dir: str, verbose: bool) -> dict[str, Any]:
    """Ray backend settings: one actor per ``runtime.cpus_per_client`` CPUs, no GPU, quiet unless verbose."""
    num_cpus = cfg.runtime.num_cpus or os.cpu_count() or 1
    init_args: dict[str, Any] = {"num_cpus": num_cpus, "_temp_dir": temp_dir, "include_dashboard": False}
    if not verbose:
        init_args.update({"logging_level": logging.ERROR, "log_to_driver": False})
    return {
        "client_resources": {"num_cpus": cfg.runtime.cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }


def run_flower(
    cfg: Config,
    run: RunDir | None,
    *,
    progress: Progress | None = None,
    verbose: bool = False,
    client_app: Any = None,
) -> tuple[Arrays, dict[str, Any]]:
    """Run the federation through Flower's ServerApp / ClientApp on the Ray backend.

    ``client_app`` replaces fedmem's ClientApp (tests use it to make clients crash).
    """
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    # Ray's unix socket paths must stay under ~107 bytes, so its temp dir cannot live deep inside the run dir.
    temp_dir = tempfile.mkdtemp(prefix="fedmem-ray-")
    os.environ.setdefault("FLWR_HOME", os.path.join(temp_dir, "flwr"))

    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmem.federation.client_app import app as fedmem_client_app
    from fedmem.federation.server_app import FlowerExecutor

    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.CRITICAL)
    outcome: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Any) -> None:
        try:
            outcome["result"] = run_federation(cfg, FlowerExecutor(grid, cfg), run, progress)
        except BaseException as exc:  # kept for the caller: Flower would wrap or log it
            outcome["error"] = exc

    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app or fedmem_client_app,
                num_supernodes=cfg.partition.num_clients,
                backend_config=backend_config(cfg, temp_dir, verbose),
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.setLevel(old_level)
        shutil.rmtree(temp_dir, ignore_errors=True)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        from fedmem.errors import FederationError

        raise FederationError("the Flower simulation ended without running the federation (use --verbose)")
    result: tuple[Arrays, dict[str, Any]] = outcome["result"]
    return result
