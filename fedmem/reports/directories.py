"""Every directory format fedmem writes, read in one place: run, sweep and audit directories.

A run directory is :class:`fedmem.results.RunDir` (``status.json``, ``summary.json``,
``metrics.jsonl``, ``config.toml``...); here it becomes a :class:`Result`, the completed federation
as the reports see it. A sweep directory (``fedmem compare``) holds ``sweep.toml`` and one run
directory per federation; an audit directory (``fedmem audit``) holds ``audit.toml`` and the run
directories ``target/``, ``shadow-000/``..., ``subsample-000/``..., each ending with
``scores.npz``. The engine (:mod:`fedmem.sweep`, :mod:`fedmem.audit`) writes ``sweep.toml`` and
``audit.toml`` through the functions here, so each format has one definition.

Nothing here imports torch, Ray, flwr or the strategies.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tomli_w

from fedmem.config import Config, load_config
from fedmem.errors import FedmemError
from fedmem.results import STATUS_COMPLETE, RunDir, atomic_write_text, stamped_dir

SWEEP_FILE = "sweep.toml"
AUDIT_FILE = "audit.toml"
TARGET = "target"  # the audited federation of an audit directory


# --------------------------------------------------------------------------- run directories


def predictor_title(summary: Mapping[str, Any], label: str) -> str:
    """A predictor's row name, as the engine recorded it (``summary.json``'s ``titles``).

    "Ditto + kNN-Per", "Per-FedAvg, 1 step"; the label itself for a summary written before titles
    were recorded.
    """
    return str(summary.get("titles", {}).get(label, label))


@dataclass(frozen=True)
class Result:
    """One completed federation as the reports see it."""

    name: str
    strategy: str
    seed: int
    grid: dict[str, str]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    lambda_grid: tuple[float, ...] = field(default=())

    @property
    def setting(self) -> str:
        """Strategy and grid values: what the seeds of one table row share."""
        return " ".join([self.strategy, *(f"{k}={v}" for k, v in self.grid.items())])

    @property
    def predictors(self) -> list[str]:
        return list(self.summary.get("predictors", list(self.summary.get("accuracy", {}))))

    @property
    def own(self) -> str:
        """The label of the strategy's own predictor."""
        own = self.summary.get("own_predictor")
        if own in self.predictors:
            return str(own)
        personal = [p for p in self.predictors if p not in ("global", "finetune", "knn")]
        return (
            personal[0]
            if personal
            else {"finetune": "finetune", "knnper": "knn"}.get(self.strategy, "global")
        )

    @property
    def title(self) -> str:
        """The setting for a reader: "Ditto", "FedProx mu=0.1" (the strategy's recorded title)."""
        name = str(self.summary.get("strategy_title", self.strategy))
        return " ".join([name, *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.grid.items())])

    def name_of(self, label: str) -> str:
        return predictor_title(self.summary, label)

    def final_clients(self) -> dict[int, dict[str, float]]:
        """Per-client metrics of the last evaluated round."""
        for record in reversed(self.metrics):
            if "clients" in record:
                return {int(p): m for p, m in record["clients"].items()}
        return {}


def load_result(path: Path, name: str | None = None, grid: Mapping[str, str] | None = None) -> Result:
    """A completed run directory as a :class:`Result` (an error naming it if it did not complete)."""
    run = RunDir(path)
    summary = run.summary()
    lambdas: tuple[float, ...] = ()
    config = path / "config.toml"
    if config.is_file():
        raw = tomllib.loads(config.read_text())
        lambdas = tuple(float(v) for v in raw.get("memory", {}).get("lambda_grid", ()))
    return Result(
        name or path.name,
        str(summary.get("strategy", "")),
        int(summary.get("seed", 0)),
        dict(grid or {}),
        summary,
        run.metrics(),
        lambdas,
    )


def load_sweep(path: Path) -> tuple[list[Result], list[tuple[str, str]]]:
    """The completed federations of a sweep directory, and (name, status) of those that did not complete."""
    done, missing = [], []
    for name, grid in sweep_federations(path).items():
        run = RunDir(path / name)
        status = run.status()["status"] if (run.path / "status.json").is_file() else "not run"
        if status == STATUS_COMPLETE:
            done.append(load_result(run.path, name, grid))
        else:
            missing.append((name, str(status)))
    return done, missing


def load_any(path: Path) -> tuple[list[Result], list[tuple[str, str]], bool]:
    """A sweep directory or a single run directory: (results, incomplete federations, is_sweep)."""
    if (path / SWEEP_FILE).is_file():
        done, missing = load_sweep(path)
        return done, missing, True
    if (path / "status.json").is_file():
        return [load_result(path)], [], False
    raise FedmemError(f"{path} is neither a fedmem run directory nor a sweep directory")


# --------------------------------------------------------------------------- sweep.toml


class SweepRequest(Protocol):
    """What ``sweep.toml`` stores of a sweep's request (:class:`fedmem.sweep.SweepSpec`)."""

    @property
    def scenario(self) -> str: ...
    @property
    def strategies(self) -> tuple[str, ...]: ...
    @property
    def seeds(self) -> tuple[int, ...]: ...
    @property
    def overrides(self) -> tuple[str, ...]: ...
    @property
    def grid(self) -> tuple[tuple[str, tuple[str, ...]], ...]: ...


class SweepMember(Protocol):
    """What ``sweep.toml`` stores of one federation (:class:`fedmem.sweep.Federation`)."""

    @property
    def name(self) -> str: ...
    @property
    def strategy(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def grid(self) -> dict[str, str]: ...


def sweep_toml(request: SweepRequest, federations: Sequence[SweepMember] = ()) -> str:
    """``sweep.toml``: the request (compared on ``--resume``) and its federations' axes."""
    return tomli_w.dumps(
        {
            "scenario": request.scenario,
            "strategies": list(request.strategies),
            "seeds": list(request.seeds),
            "set": list(request.overrides),
            "grid": {k: list(v) for k, v in request.grid},
            "federations": {
                f.name: {"strategy": f.strategy, "seed": f.seed, "grid": dict(f.grid)} for f in federations
            },
        }
    )


def _sweep_raw(path: Path) -> dict[str, Any]:
    file = Path(path) / SWEEP_FILE
    if not file.is_file():
        raise FedmemError(f"{path} is not a fedmem sweep directory (no {SWEEP_FILE})")
    return tomllib.loads(file.read_text())


def sweep_request(path: Path) -> dict[str, Any]:
    """The request stored in ``sweep.toml``, as the fields of a :class:`SweepRequest`.

    An error if ``path`` is no sweep directory.
    """
    raw = _sweep_raw(path)
    return {
        "scenario": raw["scenario"],
        "strategies": tuple(raw.get("strategies", ())),
        "seeds": tuple(int(s) for s in raw.get("seeds", ())),
        "overrides": tuple(raw.get("set", ())),
        "grid": tuple((k, tuple(v)) for k, v in raw.get("grid", {}).items()),
    }


def sweep_federations(path: Path) -> dict[str, dict[str, str]]:
    """Name -> grid values of every federation of the sweep directory ``path``, in run order."""
    return {name: dict(f.get("grid", {})) for name, f in _sweep_raw(path).get("federations", {}).items()}


# --------------------------------------------------------------------------- audit directories


def audit_config(cfg: Config, role: str, index: int = 0) -> Config:
    """The config of one federation of the audit of ``cfg``: ``audit.role`` and ``audit.index`` set."""
    return cfg.replace(audit=dataclasses.replace(cfg.audit, role=role, index=index))


def member_dir(root: Path, role: str, index: int = 0) -> Path:
    """The run directory of one federation of an audit: ``target/``, ``shadow-000/``, ``subsample-000/``."""
    return root / (TARGET if role == TARGET else f"{role}-{index:03d}")


def create_audit(cfg: Config) -> Path:
    """A new ``<runtime.output_dir>/audit-<scenario>-<timestamp>`` holding ``audit.toml``."""
    root = stamped_dir(cfg.runtime.output_dir, f"audit-{cfg.name}")
    atomic_write_text(root / AUDIT_FILE, cfg.to_toml())
    return root


def load_audit(path: Path) -> Config:
    """The audited scenario of an audit directory."""
    file = path / AUDIT_FILE
    if not file.is_file():
        raise FedmemError(f"{path} is not an audit directory (no {AUDIT_FILE})")
    return load_config(str(file))


def is_scored(path: Path) -> bool:
    """Whether ``path`` holds a complete federation of an audit, its ``scores.npz`` written."""
    return RunDir(path).is_complete() and (path / "scores.npz").is_file()


def member_scores(path: Path) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """The per-example scores of one complete federation of an audit (an error naming it if not)."""
    if not is_scored(path):
        raise FedmemError(
            f"{path.name} of audit {path.parent} is not complete; "
            f"finish it with fedmem audit ... --resume {path.parent}"
        )
    return RunDir(path).scores()
