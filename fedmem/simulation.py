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
    check_config,
    correctness_clients,
    correctness_histories,
    correctness_labels,
    current_clip_norm,
    evaluate_client,
    federation,
    get_strategy,
    initial_weights,
    labels,
    score_client,
    train_client,
)
from fedmem.config import Config, DataConfig, first_difference
from fedmem.errors import ConfigError, FederationError, FedmemError, RunFailedError
from fedmem.federated_data import held_out, new_model, text_canaries, training_clients
from fedmem.privacy import (
    CLIP,
    SAMPLE_ACCOUNTING,
    adapt_clip_norm,
    check_accounting,
    epsilon,
    noisy_mean,
    noisy_unclipped_fraction,
    sample_epsilon,
    sample_size,
    update_noise_multiplier,
)
from fedmem.probes.cscore import learning_speed
from fedmem.probes.metrics import auc
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
from fedmem.seeding import rng
from fedmem.strategy import Reply, Update
from fedmem.updates import Arrays


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


def sample_clients(seed: int, server_round: int, seen: Sequence[int], fraction: float) -> list[int]:
    """Partition ids sampled for a round, from the run's RNG keyed by the round (sorted)."""
    count = sample_size(fraction, len(seen))
    chosen = rng(seed, "sample", server_round).choice(np.asarray(seen), size=count, replace=False)
    return sorted(int(p) for p in chosen)


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


def noisy_cscore_auc(
    histories: Mapping[int, Mapping[str, np.ndarray]], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """How well the learning-speed C-score proxy finds the flipped train labels, per predictor.

    Learning speed (Jiang et al., ICML 2021, Section 6; :func:`fedmem.probes.cscore.learning_speed`)
    is each example's mean correctness over the recorded evaluations; flipped labels are learned
    late, if at all (Arpit et al., ICML 2017). Ranking examples by *low* learning speed as flipped,
    the AUC (:func:`fedmem.probes.metrics.auc`, ties counting 1/2) is the probability that a
    flipped example was learned more slowly than a clean one of the same ranking: 0.5 is chance.

    Parameters
    ----------
    histories:
        ``{pid: {"flipped": (n,) bool, <label>: (E, n) correctness}}`` (see
        :func:`fedmem.client.correctness_histories`).
    labels:
        The predictors to report, in order.

    Returns
    -------
    dict
        ``{label: {"mean": per-client AUC averaged over the clients with both flipped and clean
        examples, "pooled": the AUC over all their examples together, "clients": how many}}``;
        a label without such a client is left out.
    """
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        per_client, scores, flipped = [], [], []
        for _, h in sorted(histories.items()):
            if label not in h or not 0 < h["flipped"].sum() < h["flipped"].size:
                continue
            slow = -learning_speed(h[label])  # higher = learned later = more likely flipped
            per_client.append(auc(slow, h["flipped"]))
            scores.append(slow)
            flipped.append(h["flipped"])
        if per_client:
            out[label] = {
                "mean": float(np.mean(per_client)),
                "pooled": auc(np.concatenate(scores), np.concatenate(flipped)),
                "clients": len(per_client),
            }
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


def privatize(
    cfg: Config, replies: Sequence[Reply], sent: Arrays, sampled: int, server_round: int
) -> list[Reply]:
    """What the strategy aggregates: the replies, or under client-level DP only their noisy mean.

    With ``update.noise_multiplier > 0`` the strategy sees one reply (weight 1): the clipped
    updates' mean over the ``sampled`` clients plus N(0, (z C / sampled)^2) (``z`` adjusted for
    adaptive clipping's count query), drawn from ``rng(seed, "update-noise", round)``; its server
    step (FedAvg, a server optimizer, pFedMe's mixing) is then post-processing of what DP
    releases. Otherwise the replies, every weight 1 under ``update.weighting = "uniform"``.
    """
    u = cfg.update
    if u.noise_multiplier <= 0:
        if u.weighting == "uniform":
            return [dataclasses.replace(rep, num_examples=1) for rep in replies]
        return list(replies)
    z = u.noise_multiplier
    if u.clipping == "adaptive":
        z = update_noise_multiplier(z, u.count_noise_std)
    std = z * current_clip_norm(cfg, sent)
    mean = noisy_mean(
        [rep.arrays for rep in replies], sent, sampled, std, rng(cfg.seed, "update-noise", server_round)
    )
    return [Reply(-1, 1, mean, {})]


def adapt_clip(
    cfg: Config, state: Arrays, replies: Sequence[Reply], sent: Arrays, sampled: int, server_round: int
) -> tuple[Arrays, dict[str, float]]:
    """The next state's clip norm (adaptive clipping) and this round's privacy figures for the metrics.

    ``clip_norm`` (the C clients used), with adaptive clipping ``unclipped_fraction`` (the noisy
    estimate b of Andrew et al., noise from ``rng(seed, "clip-count-noise", round)``), with noise
    ``epsilon`` spent so far.
    """
    u = cfg.update
    out: dict[str, float] = {}
    if u.clip_norm > 0:
        out["clip_norm"] = current_clip_norm(cfg, sent)
    if u.clipping == "adaptive":
        b = noisy_unclipped_fraction(
            [rep.metrics["update_norm"] for rep in replies],
            out["clip_norm"],
            sampled,
            u.count_noise_std,
            rng(cfg.seed, "clip-count-noise", server_round),
        )
        new = adapt_clip_norm(out["clip_norm"], b, u.target_quantile, u.clip_lr)
        state = {**state, CLIP: {"norm": np.array(new, np.float64)}}
        out["unclipped_fraction"] = b
    if u.noise_multiplier > 0:
        out["epsilon"] = spent(cfg, server_round)
    return state, out


def with_clip(cfg: Config, state: Arrays) -> Arrays:
    """The initial server state plus adaptive clipping's clip norm (``update.clip_norm``), broadcast."""
    if cfg.update.clipping != "adaptive":
        return state
    return {**state, CLIP: {"norm": np.array(cfg.update.clip_norm, np.float64)}}


def spent(cfg: Config, rounds: int) -> float:
    """Epsilon at ``update.delta`` after ``rounds`` rounds of the run's mechanism (``fedmem.privacy``)."""
    u = cfg.update
    population = len(training_clients(cfg))
    sampled = sample_size(cfg.strategy.fraction_fit, population)
    return epsilon(u.noise_multiplier, sampled, population, rounds, u.delta, u.accountant)


def sample_spent(cfg: Config, rounds: int) -> float:
    """The worst training client's DP-SGD epsilon at ``update.delta`` after ``rounds`` rounds.

    Per client: ``q = B / n`` and the steps of one ``fit`` (``Strategy.dp_steps``) times the rounds
    among the first ``rounds`` in which the server sampled it (the sample is a function of the
    seed and the round, so this is exact, not the every-round bound).
    """
    s = cfg.strategy
    fed = federation(cfg)
    strategy = get_strategy(cfg)
    trainers = training_clients(cfg)
    picked = [set(sample_clients(cfg.seed, r, trainers, s.fraction_fit)) for r in range(1, rounds + 1)]
    worst = 0.0
    for pid in trainers:
        n = len(fed.clients[pid].train)
        if n == 0:
            continue
        steps = strategy.dp_steps(n) * sum(pid in p for p in picked)
        worst = max(worst, sample_epsilon(s.dp_noise, min(1.0, s.batch_size / n), steps, cfg.update.delta))
    return worst


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
    trainers = training_clients(cfg)
    # test-tuned: the round is chosen on test, as PFLlib's leaderboard does
    best: dict[str, dict[str, float]] = {"mean": {}, "weighted": {}}
    summary: dict[str, Any] = {}
    if resume is None:
        state, first, checkpointed = (
            with_clip(cfg, strategy.init(initial_weights(cfg))),
            min(1, cfg.rounds),
            0,
        )
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
            aggregated = privatize(cfg, ok, sent, len(pids), r)
            state, server_metrics = strategy.aggregate(state, aggregated, r)
            state, privacy = adapt_clip(cfg, state, ok, sent, len(pids), r)
            record["sampled"] = pids
            record["failed"] = {f.pid: f.reason for f in failures}
            record["train_loss"] = _mean(
                [rep.metrics.get("loss", math.nan) for rep in ok], [rep.num_examples for rep in ok]
            )
            if server_metrics:
                record["server"] = dict(server_metrics)
            record.update(privacy)
            del aggregated
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
    if cfg.update.noise_multiplier > 0:  # without noise no guarantee is claimed: no keys (docs/privacy.md)
        u = cfg.update
        summary.update(epsilon=spent(cfg, cfg.rounds), delta=u.delta, accountant=u.accountant)
    if cfg.strategy.gradient == "dpsgd" and cfg.strategy.dp_noise > 0:  # no noise: no keys, as above
        summary.update(
            sample_epsilon=sample_spent(cfg, cfg.rounds),
            sample_delta=cfg.update.delta,
            sample_accounting=SAMPLE_ACCOUNTING,
        )
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


def preflight(cfg: Config) -> None:
    """Check strategy names and tables, load the data and partition it, before a run directory exists.

    Also builds the model (it must read the data's inputs) and an audit's canaries (they must
    fit the data), so those mistakes stop here too, not in every client.
    """
    check_config(cfg)
    federation(cfg)
    u = cfg.update
    population = len(training_clients(cfg))
    check_accounting(u.noise_multiplier, cfg.strategy.fraction_fit, population, u.delta, u.accountant)
    new_model(cfg)
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
