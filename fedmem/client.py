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
from fedmem.models import Backbone, build_model
from fedmem.seeding import rng
from fedmem.strategy import (
    MODEL,
    ClientContext,
    ClientData,
    ModelPredictor,
    OracleReporter,
    Strategy,
    Update,
    get_weights,
)
from fedmem.training import accuracy
from fedmem.updates import Arrays, Weights, clip_update


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


Split = tuple[torch.Tensor, torch.Tensor]  # inputs (n, ...) and labels (n,)


def new_model(cfg: Config, *keys: int | str) -> Backbone:
    """The configured model for the run's data, initialised from the run seed (and ``keys``)."""
    p = pool(cfg.data, cfg.seed)
    shape = (int(p.x_uint8.shape[1]), int(p.x_uint8.shape[2]), int(p.x_uint8.shape[3]))
    m = cfg.model
    return build_model(m.name, shape, p.num_classes, m.embedding_dim, cfg.seed, *keys)


def initial_weights(cfg: Config, *keys: int | str) -> Weights:
    """Starting weights of the configured model, from the run seed (and ``keys`` for further models)."""
    return get_weights(new_model(cfg, *keys))


def client_data(cfg: Config, pid: int) -> tuple[ClientData, Split]:
    """Client ``pid``'s train and validation splits, and, apart, its test split."""
    fed = federation(cfg)
    if not 0 <= pid < len(fed.clients):
        raise FederationError(f"partition id {pid} is outside 0..{len(fed.clients) - 1}")
    p = pool(cfg.data, cfg.seed)
    split = fed.clients[pid]

    def take(idx: np.ndarray) -> Split:
        # Normalise only this client's rows (a few ms): no float copy of the whole pool per actor.
        return to_tensor(p.x_uint8[idx], p.mean, p.std), torch.tensor(p.y[idx])

    (xtr, ytr), (xva, yva) = take(split.train), take(split.val)
    return ClientData(pid, pid not in fed.unseen, p.num_classes, xtr, ytr, xva, yva), take(split.test)


@functools.lru_cache(maxsize=8)
def parse_config(text: str) -> Config:
    """Parse a shipped config once per process (names and strategy tables checked too)."""
    cfg = from_json(text)
    check_config(cfg)
    return cfg


def get_strategy(cfg: Config, name: str | None = None) -> Strategy:
    """The strategy ``name`` (default: the run's), built with its own ``[strategy.<name>]`` table."""
    from strategies import STRATEGIES  # the registry imports every strategy, which import the engine

    return STRATEGIES.get(name or cfg.strategy.name)(cfg)


def check_config(cfg: Config) -> None:
    """Check the names the strategies' registry knows (strategy, personalizers, their tables)."""
    from strategies import check_config as check

    check(cfg)


def personalizers(cfg: Config) -> list[Strategy]:
    """The run's strategy followed by ``eval.personalizers``, one per result label."""
    out: list[Strategy] = []
    for name in (cfg.strategy.name, *cfg.eval.personalizers):
        candidate = get_strategy(cfg, name)
        if all(candidate.label != s.label for s in out):
            out.append(candidate)
    return out


def _model(ctx: ClientContext) -> Backbone:
    """The received global model, or a fresh one when the state has none (IFCA's clusters)."""
    return ctx.model_from(ctx.received[MODEL]) if MODEL in ctx.received else ctx.new_model()


def train_client(cfg: Config, pid: int, server_round: int, received: Arrays) -> Update:
    """Run the strategy's ``fit`` hook on client ``pid``, then the configured update post-processing.

    Returns
    -------
    Update
        The arrays to upload (clipped to ``update.clip_norm`` when set), the hook's metrics and
        the client's averaging weight.
    """
    data, _ = client_data(cfg, pid)
    ctx = ClientContext(cfg, pid, server_round, data, received)
    update = get_strategy(cfg).fit(_model(ctx), ctx)
    for name, weights in update.arrays.items():
        bad = [k for k, v in weights.items() if not np.all(np.isfinite(v))]
        if bad:
            raise FederationError(
                f"client {pid} produced non-finite values in {name}/{bad[0]} at round {server_round}; "
                "lower strategy.lr or check the data"
            )
    if cfg.update.clip_norm > 0:
        arrays, norm = clip_update(update.arrays, received, cfg.update.clip_norm)
        update = Update(arrays, {**update.metrics, "update_norm": norm}, update.num_examples)
    return update


def evaluate_client(cfg: Config, pid: int, server_round: int, received: Arrays) -> dict[str, float]:
    """Evaluate every personalized predictor of client ``pid`` on its own test split.

    Personalizers see the train and validation splits only; the test split is used here,
    afterwards, to score what they built.

    Returns a flat dict: ``seen``, ``n_test``, ``acc/<label>`` per predictor,
    ``<label>/<name>`` for what a predictor chose (kNN-Per's lambda and k), and
    ``oracle/<label>`` for predictors that can report a test-tuned oracle.
    """
    # FAISS would otherwise start one OpenMP thread per core inside each single-CPU actor.
    set_faiss_threads(torch.get_num_threads())
    data, (x_test, y_test) = client_data(cfg, pid)
    ctx = ClientContext(cfg, pid, server_round, data, received)
    strategies = personalizers(cfg)
    out: dict[str, float] = {"seen": float(data.seen), "n_test": float(len(y_test))}
    labels = y_test.numpy()
    if strategies[0].reports_global and MODEL in received:
        global_model = ModelPredictor(_model(ctx), cfg.eval.batch_size)
        out["acc/global"] = accuracy(global_model.predict(x_test), labels)
    model = strategies[0].client_model(_model(ctx), ctx)
    for strategy in strategies:
        predictor = strategy.personalize(model, ctx)
        out[f"acc/{strategy.label}"] = accuracy(predictor.predict(x_test), labels)
        if isinstance(predictor, OracleReporter):
            out[f"oracle/{strategy.label}"] = predictor.oracle_accuracy(x_test, y_test)
        out.update({f"{strategy.label}/{k}": float(v) for k, v in predictor.info.items()})
    return out


def labels(cfg: Config) -> list[str]:
    """Result labels of a run's predictors, in table order."""
    strategies = personalizers(cfg)
    extra = ["global"] if strategies[0].reports_global else []
    return extra + [s.label for s in strategies]
