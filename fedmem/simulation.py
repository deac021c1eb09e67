"""The server-side round loop, written once against an :class:`Executor`.

An executor delivers "train" and "evaluate" requests to clients and returns
their replies keyed by partition id. Flower's ServerApp provides one over its
Grid (``fedmem.federation``); :class:`InProcessExecutor` calls the same client
functions directly, which makes it the oracle the Flower path is tested
against. Everything else here (sampling, failure accounting, aggregation through the
client-level DP wrapper, evaluation summaries, checkpoints in the run directory) is shared;
running many federations as jobs, and resuming them, is :mod:`fedmem.jobs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
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
    titles,
    train_client,
)
from fedmem.config import Config
from fedmem.errors import FederationError
from fedmem.federated_data import new_model, training_clients
from fedmem.privacy import ClientDP, sample_clients
from fedmem.probes.cscore import noisy_cscore_auc
from fedmem.results import (
    Checkpoint,
    RunDir,
    environment,
)
from fedmem.strategy import Reply, ServerContext, Update
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
    summary["titles"], summary["strategy_title"] = titles(cfg), strategy.title or strategy.name
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
