"""The server-side round loop, written once against an :class:`Executor`.

An executor delivers "train" and "evaluate" requests to clients and returns
their replies keyed by partition id. Flower's ServerApp provides one over its
Grid (``fedmem.federation``); :class:`InProcessExecutor` calls the same client
functions directly, which makes it the oracle the Flower path is tested
against. Everything else here (sampling, failure accounting, aggregation,
evaluation summaries, the run directory) is shared.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedmem.client import (
    correctness_clients,
    correctness_histories,
    correctness_labels,
    evaluate_client,
    federation,
    get_strategy,
    labels,
    score_client,
    train_client,
)
from fedmem.config import Config, DataConfig, first_difference
from fedmem.errors import ConfigError, FederationError, FedmemError, RunFailedError
from fedmem.federated_data import held_out, new_model, text_canaries, training_clients
from fedmem.privacy import ClientDP, sample_clients
from fedmem.probes.cscore import noisy_cscore_auc
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
from fedmem.strategy import Reply, ServerContext, Update
from fedmem.training import per_example_obstacle
from fedmem.updates import Arrays
from strategies import check_config


@dataclass(frozen=True)
class ClientFailure:
    """A client that raised, or whose reply never came."""

    pid: int
    reason: str


class Executor(Protocol):
    """Delivers requests to clients; replies are keyed by partition id."""

    def train(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Update | ClientFailure]:
        """Ask clients ``pids`` to train from the broadcast ``arrays``."""
        ...

    def evaluate(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Mapping[str, float] | ClientFailure]:
        """Ask clients ``pids`` to evaluate their personalized predictors."""
        ...

    def score(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Arrays | ClientFailure]:
        """Ask clients ``pids`` for per-example scores of their predictors (a leakage audit)."""
        ...


class InProcessExecutor:
    """Runs clients one after another in this process, through the same client functions as Flower."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def _call(self, pid: int, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a failing client is recorded, as Flower records an error reply
            return ClientFailure(pid, f"{type(exc).__name__}: {exc}")

    def train(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Update | ClientFailure]:
        return {p: self._call(p, partial(train_client, self.cfg, p, server_round, arrays)) for p in pids}

    def evaluate(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Mapping[str, float] | ClientFailure]:
        return {p: self._call(p, partial(evaluate_client, self.cfg, p, server_round, arrays)) for p in pids}

    def score(
        self, server_round: int, pids: Sequence[int], arrays: Arrays
    ) -> dict[int, Arrays | ClientFailure]:
        return {p: self._call(p, partial(score_client, self.cfg, p, server_round, arrays)) for p in pids}


# --------------------------------------------------------------------------- pure helpers


def client_stats(acc: Sequence[float], n: Sequence[float]) -> dict[str, float]:
    """Unweighted mean, sample-weighted mean and 10th percentile of per-client accuracies."""
    a, w = np.asarray(acc, np.float64), np.asarray(n, np.float64)
    return {
        "mean": float(a.mean()),
        "weighted_mean": float((a * w).sum() / w.sum()),
        "p10": float(np.percentile(a, 10)),
        "clients": len(a),
    }


def summarize(evals: Mapping[int, Mapping[str, float]], labels: Sequence[str]) -> dict[str, Any]:
    """Per-predictor statistics for seen and unseen clients from evaluation replies.

    ``accuracy`` / ``unseen_accuracy`` hold the honest figures; ``oracle_accuracy`` /
    ``unseen_oracle_accuracy`` the test-tuned ones of predictors that report them. With label
    noise, ``noisy_memorized`` / ``noisy_true`` (and ``unseen_``) hold the accuracy on the flipped
    train examples against their noisy and their original labels, over the clients that have
    some, weighted by their number.
    """
    out: dict[str, Any] = {}
    kinds = [("acc", "accuracy"), ("oracle", "oracle_accuracy")]
    if any("n_noisy" in m for m in evals.values()):
        kinds += [("noisy_memorized", "noisy_memorized"), ("noisy_true", "noisy_true")]
    for group, seen in (("", 1.0), ("unseen_", 0.0)):
        rows = [m for _, m in sorted(evals.items()) if m["seen"] == seen]
        for prefix, kind in kinds:
            size = "n_noisy" if prefix.startswith("noisy") else "n_test"
            stats = {}
            for label in labels:
                key = f"{prefix}/{label}"
                have = [m for m in rows if key in m]
                if have:
                    stats[label] = client_stats([m[key] for m in have], [m[size] for m in have])
            out[group + kind] = stats
    return out


def _check_failures(
    cfg: Config, what: str, server_round: int, replies: Mapping[int, Any], asked: int
) -> list[ClientFailure]:
    failures = [r for r in replies.values() if isinstance(r, ClientFailure)]
    missing = asked - len(replies)
    if len(failures) + missing > cfg.runtime.max_failure_fraction * asked:
        first = failures[0].reason if failures else "no reply"
        raise FederationError(
            f"round {server_round}: {len(failures) + missing} of {asked} clients failed to {what} "
            f"(more than runtime.max_failure_fraction = {cfg.runtime.max_failure_fraction}); "
            f"first error: {first}"
        )
    return failures


# --------------------------------------------------------------------------- the loop


Progress = Callable[[int, Mapping[str, Any]], None]


def run_federation(
    cfg: Config,
    executor: Executor,
    run: RunDir | None = None,
    progress: Progress | None = None,
    resume: Checkpoint | None = None,
) -> tuple[Arrays, dict[str, Any]]:
    """Train for ``cfg.rounds`` rounds, evaluating all clients every ``cfg.eval_every`` rounds.

    With a run directory, a checkpoint is written every ``runtime.checkpoint_every`` rounds
    (not after the last: the final state is saved with the summary); ``resume`` continues
    after the checkpoint's round. Randomness is keyed by (seed, purpose, round, client), so
    a resumed run gives exactly the numbers of an uninterrupted one.

    Returns
    -------
    state, summary
        The final server state (named arrays, ``"model"`` the global model) and the summary of
        the final evaluation (``accuracy`` and ``unseen_accuracy`` per predictor label, the
        clients that failed to evaluate in ``eval_failed``, plus the best-over-rounds figures,
        labelled as such).
    """
    strategy = get_strategy(cfg)
    fed = federation(cfg)
    predictors = labels(cfg)
    everyone = list(range(len(fed.clients)))
    server = server_context(cfg)
    trainers = server.clients
    dp = ClientDP(cfg, strategy)
    # test-tuned: the round is chosen on test, as PFLlib's leaderboard does
    best: dict[str, dict[str, float]] = {"mean": {}, "weighted": {}}
    summary: dict[str, Any] = {}
    if resume is None:
        state, first, checkpointed = dp.init(server), min(1, cfg.rounds), 0
    else:
        state, first, checkpointed = resume.state, resume.round + 1, resume.round
        best = {kind: dict(values) for kind, values in resume.best.items()}
    every = cfg.runtime.checkpoint_every
    touched: set[int] = set()  # clients sampled since the last checkpoint
    # rounds = 0 evaluates the initial model once, as "round 0" (an audit's null).
    for r in range(first, cfg.rounds + 1):
        start = time.perf_counter()
        record: dict[str, Any] = {"round": r}
        if r > 0:
            pids = sample_clients(cfg.seed, r, trainers, cfg.strategy.fraction_fit)
            sent = strategy.broadcast(state, r)
            replies = executor.train(r, pids, sent)
            failures = _check_failures(cfg, "train", r, replies, len(pids))
            ok = [
                Reply(pid, res.num_examples, res.arrays, res.metrics)
                for pid, res in sorted(replies.items())
                if not isinstance(res, ClientFailure)
            ]
            state, server_metrics, privacy = dp.aggregate(state, ok, sent, len(pids), server.at(r))
            record["sampled"] = pids
            record["failed"] = {f.pid: f.reason for f in failures}
            record["train_loss"] = _mean(
                [rep.metrics.get("loss", math.nan) for rep in ok], [rep.num_examples for rep in ok]
            )
            if server_metrics:
                record["server"] = dict(server_metrics)
            record.update(privacy)
            del replies, ok  # every client's upload: gigabytes at thousands of clients, not needed now
        if r % cfg.eval_every == 0 or r == cfg.rounds:
            evals = executor.evaluate(r, everyone, strategy.broadcast(state, r))
            eval_failures = _check_failures(cfg, "evaluate", r, evals, len(everyone))
            good = {p: m for p, m in evals.items() if not isinstance(m, ClientFailure)}
            summary = summarize(good, predictors)
            for label, stats in summary["accuracy"].items():
                for kind, key in (("mean", "mean"), ("weighted", "weighted_mean")):
                    best[kind][label] = max(best[kind].get(label, -math.inf), stats[key])
            record.update(summary)
            record["eval_failed"] = {f.pid: f.reason for f in eval_failures}
            summary["eval_failed"] = record["eval_failed"]  # a summary over fewer clients says which
            record["clients"] = {str(p): dict(m) for p, m in sorted(good.items())}
        record["seconds"] = time.perf_counter() - start
        if run is not None:
            run.append_metrics(record)
            if r > 0:
                touched.update(record["sampled"])
                if "clients" in record:  # they saved their train-correctness history
                    touched.update(correctness_clients(cfg))
            if every and r % every == 0 and 0 < r < cfg.rounds:
                run.save_checkpoint(Checkpoint(r, state, best, cfg.to_json(), environment()))
                checkpointed = r
            if r > 0:  # only clients that saved since the last checkpoint can hold stale files
                run.prune_clients(checkpointed, sorted(touched))
                if checkpointed == r:
                    touched.clear()
        if progress is not None:
            progress(r, record)
    summary["predictors"] = predictors
    summary["own_predictor"] = strategy.label
    summary["best_round_mean_accuracy"] = best["mean"]
    summary["best_round_weighted_accuracy"] = best["weighted"]
    histories = correctness_histories(cfg, cfg.rounds)
    if histories:  # label noise, in a run with a directory (docs/data.md, "Label noise")
        summary["noisy_cscore_auc"] = noisy_cscore_auc(histories, correctness_labels(cfg))
    summary.update(dp.summary(server, {pid: len(fed.clients[pid].train) for pid in trainers}))
    return state, summary


def score_federation(cfg: Config, executor: Executor, state: Arrays) -> dict[int, Arrays]:
    """Per-example scores of the trained federation's predictors (see ``fedmem.client.score_client``).

    Every client of a target federation (or a plain run) answers; in shadow and subsampled
    federations of an audit only the seen clients, whose membership the audit varies. An
    audit needs every answer, so any failure stops it.
    """
    fed = federation(cfg)
    pids = list(range(len(fed.clients))) if cfg.audit.role in ("", "target") else list(fed.seen)
    replies = executor.score(cfg.rounds, pids, get_strategy(cfg).broadcast(state, cfg.rounds))
    failed = [r for r in replies.values() if isinstance(r, ClientFailure)]
    missing = sorted(set(pids) - set(replies))
    if failed or missing:
        first = failed[0].reason if failed else f"client {missing[0]} did not reply"
        raise FederationError(
            f"{len(failed) + len(missing)} clients failed to score examples; first: {first}"
        )
    return {p: r for p, r in sorted(replies.items()) if not isinstance(r, ClientFailure)}


def _mean(values: Sequence[float], counts: Sequence[int]) -> float:
    if not values:
        return math.nan
    return float(np.average(values, weights=counts))


# --------------------------------------------------------------------------- runs of federations


def server_context(cfg: Config, server_round: int = 0) -> ServerContext:
    """What the server hooks of ``cfg``'s strategy get: its training clients and a model factory."""
    return ServerContext(cfg, server_round, training_clients(cfg), partial(new_model, cfg))


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
    gradient = cfg.strategy.gradient
    obstacle = per_example_obstacle(server.new_model()) if gradient in ("winsorized", "dpsgd") else None
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


ExecutorFactory = Callable[[Config], Executor]
Body = Callable[[ExecutorFactory], None]
Session = Callable[[Config, int, Body], None]
"""Hosts federations: ``session(cfg, num_nodes, body)`` starts an engine with ``num_nodes`` clients
(runtime settings from ``cfg``), calls ``body(make_executor)`` once, and stops the engine. Every
federation that ``body`` runs gets its own executor from ``make_executor(its_config)``."""


def in_process_session(cfg: Config, num_nodes: int, body: Body) -> None:
    """The in-process engine: clients run one after another in this process."""
    torch.set_num_threads(cfg.runtime.cpus_per_client)
    body(InProcessExecutor)


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


def run_jobs(jobs: Sequence[Job], session: Session, monitor: Monitor | None = None) -> list[Outcome]:
    """Run federations one after another in ONE session of an engine.

    Every job's config, data and partition are checked before the session starts. Each
    federation gets its own run directory, seeded sampling and failure accounting: one that
    fails is marked ``failed`` (one sentence in ``status.json``, the traceback in
    ``traceback.txt``) and the next one runs. An interruption marks the running federation
    ``interrupted`` and ends the session (KeyboardInterrupt propagates).
    """
    if not jobs:
        return []
    for job in jobs:
        preflight(job.cfg)
        if job.resume and job.path:
            run = RunDir(job.path)
            resume_point(run, ship(job.cfg, run))
    first = jobs[0].cfg
    for job in jobs[1:]:
        if job.cfg.runtime != first.runtime:
            raise ConfigError(
                "runtime settings must be the same for every federation of one session "
                f"(got {job.cfg.runtime} and {first.runtime})"
            )
    mon = monitor or Monitor()
    outcomes: list[Outcome] = []

    def body(make_executor: ExecutorFactory) -> None:
        for index, job in enumerate(jobs):
            mon.started(index, job)
            outcome = _run_job(job, make_executor, mon)
            outcomes.append(outcome)
            mon.finished(index, outcome)
            if outcome.status == STATUS_INTERRUPTED and outcome.error is not None:
                raise outcome.error

    session(first, max(j.cfg.partition.num_clients for j in jobs), body)
    return outcomes


def _run_job(job: Job, make_executor: ExecutorFactory, monitor: Monitor) -> Outcome:
    cfg = job.cfg
    toml = cfg.to_toml()
    if job.resume and job.path:
        run = RunDir(job.path)
        shipped = ship(cfg, run)
        checkpoint = resume_point(run, shipped)
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


def run_scenario(
    cfg: Config, session: Session, monitor: Monitor | None = None, resume: Path | None = None
) -> RunDir:
    """Run one scenario end to end in its own session and return its (complete) run directory.

    The run directory is created only after the config, the data and the partition are known
    to be good; if the run then fails or is interrupted, its status says so, no
    ``summary.json`` is written, and the error is raised again here (an unexpected one as
    :class:`~fedmem.errors.RunFailedError`, whose message points at the traceback).
    ``resume``: an unfinished run directory of ``cfg`` to continue from its last checkpoint.
    """
    job = Job(cfg) if resume is None else Job(cfg, resume, resume=True)
    (outcome,) = run_jobs([job], session, monitor)
    if isinstance(outcome.error, FedmemError | KeyboardInterrupt):
        raise outcome.error
    if outcome.error is not None:  # a bug, not a user's mistake: one sentence, the traceback on disk
        raise RunFailedError(
            f"run failed: {error_sentence(outcome.error)} (traceback in {outcome.run.path / 'traceback.txt'})"
        ) from outcome.error
    return outcome.run


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
