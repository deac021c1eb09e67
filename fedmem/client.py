"""What a client does when asked to train or to evaluate, independent of the transport.

Flower's ClientApp (``fedmem.federation.client_app``) and the in-process engine
both call :func:`train_client` and :func:`evaluate_client`; that is what makes
the in-process loop an oracle for the Flower run. The data (``fedmem.federated_data``)
and the parsed config are cached per process, so a Ray actor loads the data set
once and re-uses it for every client it runs. Strategies are looked up by name in
the registry of the ``strategies`` package and built once per process and config.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch

from fedmem.canary_scoring import canary_scores
from fedmem.config import Config, from_json
from fedmem.data.noise import noisy_clients
from fedmem.data.partition import label_entropy
from fedmem.errors import FederationError
from fedmem.federated_data import (
    audit_examples,
    client_data,
    federation,
    initial_weights,
    new_model,
    noisy_examples,
    noisy_train,
    pool,
    text_canaries,
)
from fedmem.memory.datastore import set_faiss_threads
from fedmem.models import Backbone
from fedmem.privacy import ClientDP
from fedmem.probes.mia import example_scores
from fedmem.results import client_folder, newest_version
from fedmem.strategy import MODEL, ClientContext, ModelPredictor, OracleReporter, Predictor, Strategy, Update
from fedmem.training import accuracy
from fedmem.updates import Arrays
from strategies import STRATEGIES, check_config

__all__ = [
    "CORRECTNESS",
    "client_data",
    "client_predictors",
    "correctness_clients",
    "correctness_histories",
    "correctness_labels",
    "evaluate_client",
    "federation",
    "get_strategy",
    "initial_weights",
    "labels",
    "new_model",
    "parse_config",
    "personalizers",
    "pool",
    "record_correctness",
    "score_client",
    "titles",
    "train_client",
]


@functools.lru_cache(maxsize=8)
def parse_config(text: str) -> Config:
    """Parse a shipped config once per process (names and strategy tables checked too)."""
    cfg = from_json(text)
    check_config(cfg)
    return cfg


# id(cfg) -> (cfg, {name: strategy}): each process builds a config's strategies once (the entry keeps
# cfg alive, so its id cannot be reused while it is here). Strategies hold no per-client state.
_BUILT: dict[int, tuple[Config, dict[str, Strategy]]] = {}
_BUILT_CONFIGS = 16


def get_strategy(cfg: Config, name: str | None = None) -> Strategy:
    """The strategy ``name`` (default: the run's), built with its own ``[strategy.<name>]`` table.

    Built once per process and config object and reused by every client call.
    """
    entry = _BUILT.get(id(cfg))
    if entry is None or entry[0] is not cfg:
        if len(_BUILT) >= _BUILT_CONFIGS:
            del _BUILT[next(iter(_BUILT))]
        entry = _BUILT[id(cfg)] = (cfg, {})
    key = name or cfg.strategy.name
    built = entry[1]
    if key not in built:
        built[key] = STRATEGIES.get(key)(cfg)
    return built[key]


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
    strategy = get_strategy(cfg)
    update = strategy.fit(_model(ctx), ctx)
    wrong = strategy.uploads().violation(list(update.arrays))
    if wrong:
        raise FederationError(f"client {pid} of strategy {strategy.name!r} {wrong} (Strategy.uploads)")
    for name, weights in update.arrays.items():
        bad = [k for k, v in weights.items() if not np.all(np.isfinite(v))]
        if bad:
            raise FederationError(
                f"client {pid} produced non-finite values in {name}/{bad[0]} at round {server_round}; "
                "lower strategy.lr or check the data"
            )
    return ClientDP(cfg, strategy).clip(update, received)


def evaluate_client(cfg: Config, pid: int, server_round: int, received: Arrays) -> dict[str, float]:
    """Evaluate every personalized predictor of client ``pid`` on its own test split.

    Personalizers see the train and validation splits only; the test split is used here,
    afterwards, to score what they built.

    Returns a flat dict: ``seen``, ``n_test``, ``label_entropy`` (bits, of the train split's
    labels), ``acc/<label>`` per predictor,
    ``<label>/<name>`` for what a predictor chose (kNN-Per's lambda and k), and
    ``oracle/<label>`` for predictors that can report a test-tuned oracle. A client with flipped
    train labels (``data.label_noise``) also reports ``n_noisy`` (how many) and, per predictor,
    ``noisy_memorized/<label>`` (accuracy on them against their noisy labels: the noise it fits)
    and ``noisy_true/<label>`` (against their original labels).
    """
    data, (x_test, y_test) = client_data(cfg, pid)
    ctx = ClientContext(cfg, pid, server_round, data, received)
    out: dict[str, float] = {
        "seen": float(data.seen),
        "n_test": float(len(y_test)),
        "label_entropy": label_entropy(data.y_train.numpy().reshape(-1), data.num_classes),
    }
    labels = y_test.numpy()
    noisy = noisy_examples(cfg, pid)
    if noisy is not None:
        out["n_noisy"] = float(len(noisy.noisy))
    train = noisy_train(cfg, pid) if pid in correctness_clients(cfg) else None
    recorded = correctness_labels(cfg) if train is not None else []
    correct: dict[str, np.ndarray] = {}
    for label, predictor in client_predictors(ctx):
        out[f"acc/{label}"] = accuracy(predictor.predict(x_test), labels)
        if noisy is not None:
            probabilities = predictor.predict(noisy.x)
            out[f"noisy_memorized/{label}"] = accuracy(probabilities, noisy.noisy)
            out[f"noisy_true/{label}"] = accuracy(probabilities, noisy.original)
        if train is not None and label in recorded:
            correct[label] = np.argmax(predictor.predict(train.x), axis=1) == train.labels
        if isinstance(predictor, OracleReporter):
            out[f"oracle/{label}"] = predictor.oracle_accuracy(x_test, y_test)
        out.update({f"{label}/{k}": float(v) for k, v in predictor.info.items()})
    if train is not None:
        record_correctness(ctx, train.flipped, correct)
    return out


# Per-client file of the train-correctness history: {"rounds": (E,), "flipped": (n,), <label>: (E, n)}.
CORRECTNESS = "train_correctness"


def correctness_clients(cfg: Config) -> list[int]:
    """The clients that record their train correctness at every evaluation (C-score of the flips).

    The seen clients with flipped labels (``data.label_noise``), when the run has a directory to
    keep the histories in; none otherwise.
    """
    d = cfg.data
    if d.label_noise == 0 or not cfg.runtime.run_dir:
        return []
    seen = federation(cfg).seen
    training = set(seen)  # clients held out of training are noisy only when listed; never recorded
    return [p for p in noisy_clients(d.noisy_clients, seen) if p in training]


def correctness_labels(cfg: Config) -> list[str]:
    """The predictors whose train correctness is recorded: ``global`` (if reported), the strategy's own.

    Each costs one prediction over the train split; ``eval.personalizers`` and adaptation curves are
    left out.
    """
    strategy = get_strategy(cfg)
    return ["global", strategy.label] if strategy.reports_global else [strategy.label]


def record_correctness(ctx: ClientContext, flipped: np.ndarray, correct: dict[str, np.ndarray]) -> None:
    """Append this evaluation's per-example train correctness to the client's history on disk.

    The history is saved as one versioned file per evaluation round (``ClientContext.save``): a
    resume rewinds it with the rest of the client's files, so a resumed run reads exactly the
    history an uninterrupted one reads. Evaluating a round again replaces its row.

    Parameters
    ----------
    flipped:
        Shape ``(n,)``, bool: which train examples have flipped labels.
    correct:
        ``{label: (n,) bool}``: the predictor's argmax equals the label trained on (the noisy one).
    """
    previous = ctx.load(CORRECTNESS) or {}
    rounds = previous.get("rounds", torch.zeros(0, dtype=torch.int64))
    keep = int((rounds < ctx.round).sum())  # rows of earlier rounds (a repeated round is replaced)
    history: dict[str, torch.Tensor] = {
        "rounds": torch.cat([rounds[:keep], torch.tensor([ctx.round])]),
        "flipped": torch.from_numpy(np.asarray(flipped, dtype=bool)),
    }
    for label, row in correct.items():
        earlier = previous.get(label, torch.zeros((0, len(row)), dtype=torch.bool))[:keep]
        history[label] = torch.cat([earlier, torch.from_numpy(np.asarray(row, dtype=bool))[None]])
    ctx.save(CORRECTNESS, history)


def correctness_histories(cfg: Config, server_round: int) -> dict[int, dict[str, np.ndarray]]:
    """The train-correctness histories the clients recorded up to ``server_round``, read on the server.

    Returns
    -------
    dict
        ``{pid: {"rounds": (E,), "flipped": (n,), <label>: (E, n) bool}}`` for each client of
        :func:`correctness_clients` that recorded one.
    """
    out: dict[int, dict[str, np.ndarray]] = {}
    for pid in correctness_clients(cfg):
        path = newest_version(client_folder(cfg.runtime.run_dir, pid), CORRECTNESS, server_round)
        if path is not None:
            saved = torch.load(path, weights_only=True)
            out[pid] = {k: v.numpy() for k, v in saved.items()}
    return out


def client_predictors(ctx: ClientContext) -> Iterator[tuple[str, Predictor]]:
    """Client ``ctx.pid``'s predictors, built lazily in table order: ``(label, predictor)``.

    The received global model first (for strategies that report it), then the strategy's own
    predictor, then each of ``eval.personalizers`` applied to the client's model.
    """
    # FAISS would otherwise start one OpenMP thread per core inside each single-CPU actor.
    set_faiss_threads(torch.get_num_threads())
    strategies = personalizers(ctx.cfg)
    if strategies[0].reports_global and MODEL in ctx.received:
        yield "global", ModelPredictor(_model(ctx), ctx.cfg.eval.batch_size)
    model = strategies[0].client_model(_model(ctx), ctx)
    for strategy in strategies:
        yield strategy.label, strategy.personalize(model, ctx)
        for label, steps in curve_points(strategy, ctx.cfg):
            yield label, strategy.adapted(model, ctx, steps)


def score_client(
    cfg: Config, pid: int, server_round: int, received: Arrays
) -> dict[str, dict[str, np.ndarray]]:
    """Per-example scores of client ``pid``'s predictors for a leakage audit.

    Scores the examples of :func:`~fedmem.federated_data.audit_examples` (the whole train
    split, the test split, canaries and references) under every predictor; on text, canaries are
    scored by log-perplexity (:func:`fedmem.canary_scoring.canary_scores`). Shadow federations
    score the train split only (LiRA's examples), subsampled federations the train split under
    the first predictor only (the global model where the strategy has one). Only these arrays
    leave the client.

    Returns
    -------
    dict
        ``{label: {"<set>/loss", "<set>/confidence", "<set>/correct"}}`` for each set, float64
        arrays (see :func:`fedmem.probes.mia.example_scores`).
    """
    data, _ = client_data(cfg, pid)
    ctx = ClientContext(cfg, pid, server_round, data, received)
    examples = audit_examples(cfg, pid)
    canaries = text_canaries(cfg) if cfg.audit.role == "target" else None
    if cfg.audit.role in ("shadow", "subsample"):  # LiRA and the counterfactual need only members
        examples = {"train": examples["train"]}
    out: dict[str, dict[str, np.ndarray]] = {}
    for label, predictor in client_predictors(ctx):
        out[label] = {
            f"{name}/{field}": values
            for name, (x, y) in examples.items()
            for field, values in example_scores(predictor.predict(x), y.numpy()).items()
        }
        if canaries is not None:
            out[label].update(canary_scores(predictor, canaries))
        if cfg.audit.role == "subsample":
            break
    return out


def labels(cfg: Config) -> list[str]:
    """Result labels of a run's predictors, in table order."""
    strategies = personalizers(cfg)
    extra = ["global"] if strategies[0].reports_global else []
    return extra + [label for s in strategies for label in [s.label, *dict(curve_points(s, cfg))]]


def titles(cfg: Config) -> dict[str, str]:
    """Each predictor label's title as tables and figures show it (``summary.json``'s ``titles``).

    "global" for the received global model, else the strategy's or personalizer's ``title``;
    fine-tuning and kNN-Per after a personal predictor name the model they start from ("Ditto +
    kNN-Per"); ``<label>@<k>`` (``eval.adapt_steps``) reads "<title>, <k> steps".
    """
    predictors = labels(cfg)
    strategies = personalizers(cfg)
    own = {s.label: s.predictor_title or s.title or s.label for s in strategies}
    personal = [s.label for s in strategies if s.label != "global" and not s.on_any_model]
    out = {"global": "global"}
    for s in strategies:
        title = own[s.label] if s.label != "global" else "global"
        if s.on_any_model and personal:
            title = f"{own[personal[0]]} + {title}"
        out[s.label] = title
        for label, steps in curve_points(s, cfg):
            out[label] = f"{title}, {steps} step{'' if steps == 1 else 's'}"
    return {label: out[label] for label in predictors}


def curve_points(strategy: Strategy, cfg: Config) -> list[tuple[str, int]]:
    """``(label, steps)`` of ``strategy``'s adaptation curve (``eval.adapt_steps``; none unless it adapts)."""
    return [(f"{strategy.label}@{k}", k) for k in cfg.eval.adapt_steps] if strategy.adapts else []
