"""Runs of federations: many in ONE session of an engine, with their run directories, failures and resumes.

A :class:`Job` is one federation to run (a plain run, a sweep's federation, an audit's target,
shadow or subsample); :func:`run_jobs` checks every job before anything is written
(:func:`preflight`: names, tables, the data, the partition, what the strategy and the DP
wrapper refuse), then runs them one after another in one session (``fedmem.simulation``'s
round loop over the session's executors), marking each ``complete``, ``failed`` or
``interrupted``. :func:`resume_point` decides where an unfinished run continues.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmem.client import get_strategy
from fedmem.config import Config, DataConfig, first_difference, load_config
from fedmem.errors import ConfigError, FedmemError, RunFailedError
from fedmem.federated_data import federation, held_out, text_canaries
from fedmem.privacy import ClientDP
from fedmem.results import (
    CHECKPOINT,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    Checkpoint,
    RunDir,
    code_version,
    environment,
    error_sentence,
)
from fedmem.simulation import ExecutorFactory, Session, run_federation, score_federation, server_context
from fedmem.training import per_example_obstacle
from strategies import check_config


def preflight(cfg: Config) -> None:
    """Check strategy names and tables, load the data and partition it, before a run directory exists.

    Also builds the model (it must read the data's inputs, and ``winsorized`` and ``dpsgd``
    gradients need it to have per-example gradients), asks the strategy's ``check`` hook and the
    client-level DP wrapper what they refuse, and builds an audit's canaries (they must fit the
    data), so those mistakes stop here too, not in every client.
    """
    check_config(cfg)
    federation(cfg)
    server = server_context(cfg)
    model = server.new_model()  # refuses a model that cannot read the data (a CNN on text)
    gradient = cfg.strategy.gradient
    obstacle = per_example_obstacle(model) if gradient in ("winsorized", "dpsgd") else None
    if obstacle is not None:
        other = "'median3'" if gradient == "winsorized" else "'mean'"
        raise ConfigError(
            f"strategy.gradient = {gradient!r} needs per-example gradients, but model {cfg.model.name!r} "
            f"has none: {obstacle}; use strategy.gradient = {other} or model.name = 'cnn'"
        )
    strategy = get_strategy(cfg)
    strategy.check(server)
    ClientDP(cfg, strategy).check(server)
    held_out(cfg)
    text_canaries(cfg)


@dataclass(frozen=True)
class Job:
    """One federation to run: its config and, optionally, the exact run directory to create."""

    cfg: Config
    path: Path | None = None  # None: a new time-stamped directory under runtime.output_dir
    score: bool = False  # after training, collect per-example scores into scores.npz (an audit)
    resume: bool = False  # ``path`` holds an unfinished run: continue it from its last checkpoint


@dataclass(frozen=True)
class Outcome:
    """What became of a job: its run directory, its status and, unless complete, the error."""

    job: Job
    run: RunDir
    status: str
    error: BaseException | None = None


class Monitor:
    """Callbacks of :func:`run_jobs`; the defaults do nothing."""

    def started(self, index: int, job: Job) -> None:
        """Federation ``index`` of the jobs starts."""

    def round(self, server_round: int, record: Mapping[str, Any]) -> None:
        """The running federation finished a round (``record`` is its metrics line)."""

    def finished(self, index: int, outcome: Outcome) -> None:
        """Federation ``index`` ended, complete or not."""


@dataclass(frozen=True)
class Checked:
    """Jobs that passed :func:`check_jobs` and where each resumed one continues (for :func:`run_jobs`)."""

    jobs: tuple[Job, ...]
    points: Mapping[int, Checkpoint | None]  # job index -> the checkpoint a resumed job continues from

    def resumes_after(self, index: int) -> int:
        """The round job ``index`` continues after (0: from the start)."""
        point = self.points.get(index)
        return point.round if point is not None else 0


def check_jobs(jobs: Sequence[Job], *, preflighted: bool = False) -> Checked:
    """Everything that can be refused before anything is written, checked once.

    Every job's config, data and partition (:func:`preflight`), unless the caller did so before
    writing a directory of its own (``preflighted``: a sweep or an audit); each resumed job's
    checkpoint, read once (a refused resume stops here, naming why); one runtime for all.
    """
    if not preflighted:
        for job in jobs:
            preflight(job.cfg)
    points = {
        index: resume_point(RunDir(job.path), ship(job.cfg, RunDir(job.path)))
        for index, job in enumerate(jobs)
        if job.resume and job.path
    }
    for job in jobs[1:]:
        if job.cfg.runtime != jobs[0].cfg.runtime:
            raise ConfigError(
                "runtime settings must be the same for every federation of one session "
                f"(got {job.cfg.runtime} and {jobs[0].cfg.runtime})"
            )
    return Checked(tuple(jobs), points)


def run_jobs(
    jobs: Sequence[Job] | Checked, session: Session, monitor: Monitor | None = None
) -> list[Outcome]:
    """Run federations one after another in ONE session of an engine.

    ``jobs`` not yet checked are checked first (:func:`check_jobs`), before the session starts.
    Each federation gets its own run directory, seeded sampling and failure accounting: one that
    fails is marked ``failed`` (one sentence in ``status.json``, the traceback in
    ``traceback.txt``) and the next one runs. An interruption marks the running federation
    ``interrupted`` and ends the session (KeyboardInterrupt propagates).
    """
    checked = jobs if isinstance(jobs, Checked) else check_jobs(jobs)
    if not checked.jobs:
        return []
    mon = monitor or Monitor()
    outcomes: list[Outcome] = []

    def body(make_executor: ExecutorFactory) -> None:
        for index, job in enumerate(checked.jobs):
            mon.started(index, job)
            outcome = _run_job(job, make_executor, mon, checked.points.get(index))
            outcomes.append(outcome)
            mon.finished(index, outcome)
            if outcome.status == STATUS_INTERRUPTED and outcome.error is not None:
                raise outcome.error

    session(checked.jobs[0].cfg, max(j.cfg.partition.num_clients for j in checked.jobs), body)
    return outcomes


def _run_job(
    job: Job, make_executor: ExecutorFactory, monitor: Monitor, checkpoint: Checkpoint | None
) -> Outcome:
    cfg = job.cfg
    toml = cfg.to_toml()
    if job.resume and job.path:
        run = RunDir(job.path)
        shipped = ship(cfg, run)
        start = checkpoint.round if checkpoint else 0
        run.rewind(start)
        run.set_status(STATUS_RUNNING, resumed_from_round=start)
    else:
        run = (
            RunDir.create_at(job.path, toml)
            if job.path
            else RunDir.create(cfg.runtime.output_dir, cfg.name, toml)
        )
        shipped, checkpoint = ship(cfg, run), None
    started = time.time()
    try:
        executor = make_executor(shipped)
        state, summary = run_federation(shipped, executor, run, monitor.round, checkpoint)
        run.save_state(state)
        if job.score:
            run.save_scores(score_federation(shipped, executor, state))
        summary.update(
            {
                "scenario": cfg.name,
                "strategy": cfg.strategy.name,
                "seed": cfg.seed,
                "rounds": cfg.rounds,
                "engine": cfg.runtime.engine,
                "wall_seconds": time.time() - started,
                "environment": environment(),
            }
        )
        run.complete(summary)
    except KeyboardInterrupt as exc:
        run.set_status(STATUS_INTERRUPTED, error="interrupted by the user")
        return Outcome(job, run, STATUS_INTERRUPTED, exc)
    except Exception as exc:
        run.fail(exc)
        return Outcome(job, run, STATUS_FAILED, exc)
    return Outcome(job, run, STATUS_COMPLETE)


def continued(job: Job) -> Job:
    """``job`` (whose run directory exists but is not complete) as a resume of what it wrote.

    A directory that never got as far as a status is removed and the job starts afresh.
    """
    assert job.path is not None
    if (job.path / "status.json").is_file():
        return dataclasses.replace(job, resume=True)
    shutil.rmtree(job.path, ignore_errors=True)
    return job


def scenario_job(cfg: Config, resume: Path | None = None) -> Job:
    """The job of one scenario: a new run directory, or ``resume``, an unfinished one of ``cfg``."""
    return Job(cfg) if resume is None else Job(cfg, resume, resume=True)


def run_scenario(
    cfg: Config | Checked, session: Session, monitor: Monitor | None = None, resume: Path | None = None
) -> RunDir:
    """Run one scenario end to end in its own session and return its (complete) run directory.

    ``cfg``: the scenario's config, or its :func:`scenario_job` already checked (the CLI checks
    before it draws a progress bar). The run directory is created only after the config, the data
    and the partition are known to be good; if the run then fails or is interrupted, its status
    says so, no ``summary.json`` is written, and the error is raised again here (an unexpected
    one as :class:`~fedmem.errors.RunFailedError`, whose message points at the traceback).
    ``resume``: an unfinished run directory of ``cfg`` to continue from its last checkpoint.
    """
    checked = cfg if isinstance(cfg, Checked) else check_jobs([scenario_job(cfg, resume)])
    (outcome,) = run_jobs(checked, session, monitor)
    if isinstance(outcome.error, FedmemError | KeyboardInterrupt):
        raise outcome.error
    if outcome.error is not None:  # a bug, not a user's mistake: one sentence, the traceback on disk
        raise RunFailedError(
            f"run failed: {error_sentence(outcome.error)} (traceback in {outcome.run.path / 'traceback.txt'})"
        ) from outcome.error
    return outcome.run


def run_config(path: Path, overrides: Sequence[str] = ()) -> Config:
    """The config of the run directory ``path`` (its ``config.toml``), with ``overrides`` applied."""
    file = Path(path) / "config.toml"
    if not file.is_file():
        raise FedmemError(f"{path} is not a fedmem run directory (no config.toml)")
    return load_config(str(file), overrides)


def ship(cfg: Config, run: RunDir) -> Config:
    """The config clients receive: the run directory and the data root as absolute paths."""
    shipped = cfg.with_runtime(run_dir=str(run.path.resolve()))
    return shipped.replace(data=_absolute_root(shipped))


# Keys a resume may change: where and how it runs, and where the data are found, not what it computes.
RESUMABLE_KEYS = ("runtime", "data.root")
# Versions a resume must share with the checkpoint's writer: they decide the numbers (flwr does
# not: a Flower run equals the in-process one; fedmem's own code is checked by its code version).
RESUME_LIBRARIES = ("python", "torch", "numpy", "faiss-cpu")


def resume_point(run: RunDir, shipped: Config) -> Checkpoint | None:
    """Where the unfinished ``run`` continues: its checkpoint, or None to start again at round 1.

    Refused, with one sentence: a complete run, a run that is still running, a checkpoint
    written by other code, under other library versions or for another config (naming what
    differs). Changes nothing.
    """
    if run.is_complete():
        raise FedmemError(f"run {run.path} is complete already; nothing to resume")
    owner = run.live_owner()
    if owner:
        raise FedmemError(f"run {run.path} is still running ({owner}); stop it before resuming it")
    checkpoint = run.checkpoint()
    if checkpoint is not None:
        if checkpoint.code != code_version():
            raise ConfigError(
                f"cannot resume {run.path}: its checkpoint was written by fedmem {checkpoint.code} and "
                f"this is fedmem {code_version()} (the code version differs); resume with the code "
                f"that started the run, or delete {run.path / CHECKPOINT} to run it again from round 1"
            )
        here = environment()
        for name in RESUME_LIBRARIES:
            if checkpoint.environment.get(name) != here[name]:
                raise ConfigError(
                    f"cannot resume {run.path}: its checkpoint was written under {name} "
                    f"{checkpoint.environment.get(name, '(unknown)')} and this is {name} {here[name]}, so "
                    f"the numbers would differ from an uninterrupted run's; resume with the versions that "
                    f"started the run, or delete {run.path / CHECKPOINT} to run it again from round 1"
                )
        differs = first_difference(json.loads(checkpoint.config), shipped.to_dict(), skip=RESUMABLE_KEYS)
        if differs:
            raise ConfigError(
                f"cannot resume {run.path}: config key {differs} differs from its checkpoint's; "
                f"resume with the config the run started with, or delete {run.path / CHECKPOINT}"
            )
    return checkpoint


def _absolute_root(cfg: Config) -> DataConfig:
    return dataclasses.replace(cfg.data, root=str(Path(cfg.data.root).expanduser().resolve()))
