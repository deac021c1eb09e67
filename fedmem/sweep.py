"""Many federations in one warm session: strategies x seeds x grid values, one directory, one table.

A sweep directory (``fedmem compare``)::

    <output_dir>/<scenario>-sweep-<timestamp>/
        sweep.toml        what was asked (scenario, strategies, seeds, --set, --grid)
        <federation>/     one run directory per federation, named <strategy>-s<seed>[-<key>=<value>...]
        results.csv       federation x predictor x client group x statistic (long format)
        per_client.csv    federation x client x predictor: accuracy, test size, kNN-Per's lambda and k
        report.md         the table and the plots
        plots/*.png

Every federation runs in ONE session of the engine (:func:`session_for`): Ray, the actors and
Flower's node discovery are paid once. Each federation still has its own config, seeded
sampling, run directory and failure accounting; a sweep started again with ``--resume DIR``
skips the federations whose run directory is complete and redoes the others.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmem.config import Config, load_config
from fedmem.errors import ConfigError
from fedmem.federation.sessions import session_for
from fedmem.jobs import Job, Monitor, Outcome, check_jobs, continued, preflight, run_jobs
from fedmem.reports.directories import SWEEP_FILE, sweep_federations, sweep_request, sweep_toml
from fedmem.results import RunDir, atomic_write_text, stamped_dir
from fedmem.simulation import Session
from strategies import check_config

__all__ = [
    "Sweep",
    "SweepRun",
    "SweepSpec",
    "expand",
    "parse_grid",
    "run_sweep",
]


# --------------------------------------------------------------------------- what is asked


def parse_grid(item: str) -> tuple[str, tuple[str, ...]]:
    """``"strategy.lr=0.01,0.05"`` -> ``("strategy.lr", ("0.01", "0.05"))``; commas inside [...] stay."""
    key, sep, text = item.partition("=")
    key = key.strip()
    values: list[str] = []
    depth, current = 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    if not sep or not key or any(not v for v in values):
        raise ConfigError(
            f"--grid expects KEY=V1,V2,... with a dotted key (e.g. strategy.lr=0.01,0.05), got {item!r}"
        )
    if key.startswith("runtime.") or key in ("seed", "strategy.name"):
        raise ConfigError(
            f"--grid cannot vary {key}: use --seeds for seeds and --strategies for strategies; runtime "
            "settings are shared by every federation of a session (set them with --set)"
        )
    return key, tuple(values)


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs: a scenario, its overrides, and the axes strategies x seeds x grid."""

    scenario: str
    strategies: tuple[str, ...] = ()  # () = the scenario's own strategy
    seeds: tuple[int, ...] = ()  # () = the scenario's own seed
    overrides: tuple[str, ...] = ()
    grid: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def to_toml(self, federations: Sequence[SweepRun] = ()) -> str:
        """``sweep.toml``: the request (compared on ``--resume``) and its federations' axes."""
        return sweep_toml(self, federations)


@dataclass(frozen=True)
class SweepRun:
    """One federation of a sweep: its name (its run directory's), its axes and its config."""

    name: str
    strategy: str
    seed: int
    grid: dict[str, str] = field(default_factory=dict)
    cfg: Config = field(default_factory=Config)

    @property
    def setting(self) -> str:
        """What the seeds of one table row share: the strategy and the grid values."""
        return " ".join([self.strategy, *(f"{k}={v}" for k, v in self.grid.items())])


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def expand(spec: SweepSpec, extra: Sequence[str] = ()) -> list[SweepRun]:
    """Every combination strategies x grid values x seeds, as configs (names and tables checked).

    ``extra`` overrides apply after the spec's (``--out`` and ``--engine`` of the command).
    """
    base = load_config(spec.scenario, [*spec.overrides, *extra])
    strategies = spec.strategies or (base.strategy.name,)
    seeds = spec.seeds or (base.seed,)
    keys = [k for k, _ in spec.grid]
    out = []
    for strategy, values, seed in itertools.product(
        strategies, itertools.product(*(v for _, v in spec.grid)), seeds
    ):
        grid = dict(zip(keys, values, strict=True))
        sets = [f"strategy.name={strategy!r}", f"seed={seed}", *(f"{k}={v}" for k, v in grid.items())]
        cfg = load_config(spec.scenario, [*spec.overrides, *extra, *sets])
        check_config(cfg)  # names and tables now, before Ray starts; data and model in run_sweep
        suffix = "".join(f"-{k.rsplit('.', 1)[-1]}={_UNSAFE.sub('_', v)}" for k, v in grid.items())
        out.append(SweepRun(f"{strategy}-s{seed}{suffix}", strategy, seed, grid, cfg))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise ConfigError(
            "two federations of the sweep would share a name: repeated strategies, seeds or values"
        )
    return out


# --------------------------------------------------------------------------- the sweep directory


class Sweep:
    """A sweep directory being written or read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: str | Path, spec: SweepSpec, feds: Sequence[SweepRun]) -> Sweep:
        """A new ``<output_dir>/<scenario>-sweep-<timestamp>`` holding ``sweep.toml``."""
        path = stamped_dir(output_dir, f"{feds[0].cfg.name}-sweep")
        atomic_write_text(path / SWEEP_FILE, spec.to_toml(feds))
        return cls(path)

    def spec(self) -> SweepSpec:
        """The request stored in ``sweep.toml`` (an error if this is no sweep directory)."""
        return SweepSpec(**sweep_request(self.path))

    def federations(self) -> dict[str, dict[str, str]]:
        """Name -> grid values of every federation of the sweep, in run order."""
        return sweep_federations(self.path)

    def check_resumable(self, spec: SweepSpec) -> None:
        """Refuse to resume with a different request, naming the first field that differs."""
        stored = self.spec()
        for name in ("scenario", "strategies", "seeds", "overrides", "grid"):
            if getattr(stored, name) != getattr(spec, name):
                flag = {"overrides": "--set", "grid": "--grid", "scenario": "SCENARIO"}.get(name, f"--{name}")
                raise ConfigError(
                    f"cannot resume {self.path}: {flag} differs from the sweep it holds "
                    f"({getattr(stored, name)!r} there, {getattr(spec, name)!r} now)"
                )

    def run_dir(self, fed: SweepRun) -> RunDir:
        """The run directory of one federation (it may not exist yet)."""
        return RunDir(self.path / fed.name)

    def is_complete(self, fed: SweepRun) -> bool:
        """Whether the federation's run directory holds a complete run."""
        return self.run_dir(fed).is_complete()


def run_sweep(
    spec: SweepSpec,
    runs: Sequence[SweepRun] | None = None,
    *,
    extra: Sequence[str] = (),
    resume: Path | None = None,
    monitor: Monitor | None = None,
    verbose: bool = False,
    session: Session | None = None,
) -> tuple[Sweep, list[SweepRun], list[Outcome]]:
    """Run (or resume) a sweep; return its directory, all its federations and the outcomes of this call.

    ``runs``: ``expand(spec, extra)`` when the caller has it already. Nothing is created before
    every federation's config, data and partition passed their checks (once). Federations that
    did not complete in an earlier attempt continue from their last checkpoint.
    """
    feds = list(runs) if runs is not None else expand(spec, extra)
    if resume is not None:
        sweep = Sweep(resume)
        sweep.check_resumable(spec)
    todo = [f for f in feds if resume is None or not sweep.is_complete(f)]
    for fed in todo:  # before the sweep directory exists
        preflight(fed.cfg)
    if resume is None:
        sweep = Sweep.create(feds[0].cfg.runtime.output_dir, spec, feds)
    # An unfinished federation continues from its checkpoint (fedmem.jobs.resume_point).
    jobs = [continued(Job(f.cfg, sweep.path / f.name)) for f in todo]
    outcomes = []
    if jobs:
        checked = check_jobs(jobs, preflighted=True)  # the resumed ones' checkpoints
        outcomes = run_jobs(checked, session or session_for(jobs[0].cfg, verbose=verbose), monitor)
    return sweep, feds, outcomes
