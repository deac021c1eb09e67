"""What a client does when asked to train or to evaluate, independent of the transport.

Flower's ClientApp (``fedmem.federation.client_app``) and the in-process engine
both call :func:`train_client` and :func:`evaluate_client`; that is what makes
the in-process loop an oracle for the Flower run. Data, the federation and the
parsed config are cached per process (module-level), so a Ray actor loads the
data set once and re-uses it for every client it runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from fedmem.config import Config, DataConfig, from_json
from fedmem.data.datasets import load_dataset, to_tensor
from fedmem.data.partition import Federation, build_federation
from fedmem.errors import FederationError
from fedmem.memory.datastore import set_faiss_threads
from fedmem.seeding import rng
from fedmem.strategy import (
    ClientContext,
    ClientData,
    OracleReporter,
    Strategy,
    Weights,
    get_weights,
    set_weights,
)
from fedmem.training import accuracy


@dataclass(frozen=True)
class Pool:
    """The pooled data set (possibly a seeded subset) that the federation partitions."""

    x_uint8: np.ndarray  # (N, C, H, W)
    y: np.ndarray  # (N,) int64
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@functools.lru_cache(maxsize=4)
def pool(data: DataConfig, seed: int) -> Pool:
    """Load the data set and, if ``data.max_samples`` is set, draw a seeded subset of it."""
    ds = load_dataset(data.dataset, data.root, download=data.download)
    x, y = ds.x, ds.y
    if 0 < data.max_samples < len(y):
        keep = np.sort(rng(seed, "subset").choice(len(y), data.max_samples, replace=False))
        x, y = x[keep], y[keep]
    return Pool(x, y, ds.num_classes, tuple(ds.mean), tuple(ds.std))


def federation(cfg: Config) -> Federation:
    """The partition of the pool into clients with their train / val / test splits."""
    p = cfg.partition
    return build_federation(
        pool(cfg.data, cfg.seed).y,
        scheme=p.scheme,
        num_clients=p.num_clients,
        seed=cfg.seed,
        alpha=p.alpha,
        classes_per_client=p.classes_per_client,
        min_size=p.min_size,
        train_fraction=p.train_fraction,
        val_fraction=p.val_fraction,
        unseen_fraction=p.unseen_fraction,
    )


def client_data(cfg: Config, pid: int) -> ClientData:
    """Client ``pid``'s three splits as tensors."""
    fed = federation(cfg)
    if not 0 <= pid < len(fed.clients):
        raise FederationError(f"partition id {pid} is outside 0..{len(fed.clients) - 1}")
    p = pool(cfg.data, cfg.seed)
    split = fed.clients[pid]

    def take(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Normalise only this client's rows (a few ms): no float copy of the whole pool per actor.
        return to_tensor(p.x_uint8[idx], p.mean, p.std), torch.tensor(p.y[idx])

    (xtr, ytr), (xva, yva), (xte, yte) = take(split.train), take(split.val), take(split.test)
    return ClientData(pid, pid not in fed.unseen, p.num_classes, xtr, ytr, xva, yva, xte, yte)


@functools.lru_cache(maxsize=8)
def parse_config(text: str) -> Config:
    """Parse a shipped config once per process."""
    return from_json(text)


def _strategy(cfg: Config, name: str | None = None) -> Strategy:
    from strategies import STRATEGIES

    return STRATEGIES.get(name or cfg.strategy.name)(cfg)


def personalizers(cfg: Config) -> list[Strategy]:
    """The run's strategy followed by ``eval.personalizers``, one per result label."""
    out: list[Strategy] = []
    for name in (cfg.strategy.name, *cfg.eval.personalizers):
        candidate = _strategy(cfg, name)
        if all(candidate.label != s.label for s in out):
            out.append(candidate)
    return out


def train_client(
    cfg: Config, pid: int, server_round: int, weights: Weights
) -> tuple[Weights, dict[str, float], int]:
    """Run the strategy's ``fit`` hook on client ``pid``.

    Returns
    -------
    weights, metrics, num_examples
        The updated weights, the hook's metrics and the size of the train split
        (FedAvg's averaging weight).
    """
    ctx = ClientContext(cfg, pid, server_round, client_data(cfg, pid))
    model = ctx.new_model()
    set_weights(model, weights)
    metrics = dict(_strategy(cfg).fit(model, ctx))
    out = get_weights(model)
    bad = [k for k, v in out.items() if not np.all(np.isfinite(v))]
    if bad:
        raise FederationError(
            f"client {pid} produced non-finite weights in {bad[0]} at round {server_round}; "
            "lower strategy.lr or check the data"
        )
    return out, metrics, len(ctx.data.y_train)


def evaluate_client(cfg: Config, pid: int, server_round: int, weights: Weights) -> dict[str, float]:
    """Evaluate every personalized predictor of client ``pid`` on its own test split.

    Returns a flat dict: ``seen``, ``n_test``, ``acc/<label>`` per predictor,
    ``<label>/<name>`` for what a predictor chose (kNN-Per's lambda and k), and
    ``oracle/<label>`` for predictors that can report a test-tuned oracle.
    """
    # FAISS would otherwise start one OpenMP thread per core inside each single-CPU actor.
    set_faiss_threads(torch.get_num_threads())
    ctx = ClientContext(cfg, pid, server_round, client_data(cfg, pid))
    strategies = personalizers(cfg)
    model = ctx.new_model()
    set_weights(model, weights)
    model = strategies[0].client_model(model, ctx)
    out: dict[str, float] = {"seen": float(ctx.data.seen), "n_test": float(len(ctx.data.y_test))}
    y_test = ctx.data.y_test.numpy()
    for strategy in strategies:
        predictor = strategy.personalize(model, ctx)
        out[f"acc/{strategy.label}"] = accuracy(predictor.predict(ctx.data.x_test), y_test)
        if isinstance(predictor, OracleReporter):
            out[f"oracle/{strategy.label}"] = predictor.oracle_accuracy(ctx.data.x_test, ctx.data.y_test)
        out.update({f"{strategy.label}/{k}": float(v) for k, v in predictor.info.items()})
    return out
