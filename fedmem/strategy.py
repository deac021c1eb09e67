"""The Strategy base (interface version 2): server hooks over named arrays, client hooks over one model.

A strategy is a small object holding its hyperparameters; the engine owns the
round loop and the local training loop and calls these hooks. The defaults are
FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017): train the received model locally with SGD,
average the replies weighted by the number of training examples, predict with
the model as is. A strategy overrides only what differs.

What travels is named arrays (:data:`Arrays`, name -> state dict): the server
state starts as ``init(model, ctx)`` = ``{"model": ...}``; ``broadcast`` picks what
clients receive (everything except names under ``server/``, which stay on the
server: optimizer moments, accountants); ``fit`` returns an :class:`Update`
with the arrays the client chooses to upload (the names it declares in ``uploads``);
``aggregate`` turns the state and the replies into the next state plus server metrics.

Server hooks get a :class:`ServerContext` (after pfl-research's ``CentralContext`` and
fedjax's explicit dependencies): the round, the number of training clients, a model
factory and the run's seed, so that no strategy reaches into the data pipeline.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from fedmem.config import Config, NoParams, build_dataclass
from fedmem.errors import FederationError
from fedmem.federated_data import ClientData
from fedmem.losses import LossFn, training_loss
from fedmem.models import Backbone, build_model, get_weights
from fedmem.results import atomic_torch_save, client_file, client_folder, newest_version
from fedmem.seeding import rng as derive_rng
from fedmem.seeding import torch_generator
from fedmem.training import (
    ExtraLoss,
    Gradient,
    SGDSettings,
    Step,
    TrainStats,
    cross_entropy_step,
    gradient_rule,
    logits_and_embeddings,
    softmax,
    steps_per_fit,
    train,
)
from fedmem.updates import Arrays, Averager, Weights, aggregate_uploads, merge_average, weighted_average

MODEL = "model"  # the global model's name in the server state
PRIVATE = "server/"  # names under this prefix never leave the server

__all__ = [
    "MODEL",
    "PERSONAL",
    "PRIVATE",
    "Arrays",
    "ClientContext",
    "ClientData",
    "ModelPredictor",
    "OracleReporter",
    "PositionwisePredictor",
    "Predictor",
    "Reply",
    "ServerContext",
    "Strategy",
    "Update",
    "Uploads",
    "Weights",
    "average_of",
    "frozen",
    "get_weights",
    "load_personal",
    "set_weights",
]


@dataclass(frozen=True)
class ClientContext:
    """What a client hook may use: config, its data, its round, what it received, RNGs, its files."""

    cfg: Config
    pid: int
    round: int
    data: ClientData
    received: Arrays = field(default_factory=dict)

    def rng(self, purpose: str) -> np.random.Generator:
        """A numpy generator keyed by (seed, purpose, round, client id)."""
        return derive_rng(self.cfg.seed, purpose, self.round, self.pid)

    def torch_rng(self, purpose: str) -> torch.Generator:
        """A CPU torch generator keyed by (seed, purpose, round, client id)."""
        return torch_generator(self.cfg.seed, purpose, self.round, self.pid)

    def folder(self) -> Path:
        """This client's folder of saved objects, inside the run directory."""
        if not self.cfg.runtime.run_dir:
            raise FederationError("this strategy keeps per-client files but runtime.run_dir is not set")
        return client_folder(self.cfg.runtime.run_dir, self.pid)

    def save(self, name: str, obj: Any) -> None:
        """Keep ``obj`` (tensors, dicts of tensors, numbers) for this client's later rounds; atomic.

        Saved as this round's version (see :mod:`fedmem.results`), so a checkpoint of an
        earlier round still finds the client as it was then.
        """
        atomic_torch_save(obj, client_file(self.folder(), name, self.round))

    def load(self, name: str) -> Any | None:
        """The newest of what :meth:`save` kept under ``name`` up to this round, or None."""
        path = newest_version(self.folder(), name, self.round)
        return None if path is None else torch.load(path, weights_only=True)

    def new_model(self) -> Backbone:
        """A fresh backbone of the configured architecture (weights from the run seed)."""
        m = self.cfg.model
        return build_model(m.name, self.data.in_shape, self.data.num_classes, m.embedding_dim, self.cfg.seed)

    def model_from(self, weights: Mapping[str, np.ndarray]) -> Backbone:
        """A fresh backbone holding ``weights`` (e.g. ``ctx.received["cluster/1"]``)."""
        model = self.new_model()
        set_weights(model, weights)
        return model

    def loss(self) -> LossFn:
        """The training loss of every local step: ``strategy.loss`` (cross-entropy by default)."""
        return training_loss(self.cfg.strategy)

    def sgd(self) -> SGDSettings:
        """The local optimizer settings of ``[strategy]``."""
        s = self.cfg.strategy
        return SGDSettings(s.lr, s.momentum, s.weight_decay, s.local_epochs, s.local_steps, s.batch_size)

    @property
    def num_train(self) -> int:
        """Size of the train split (FedAvg's averaging weight)."""
        return len(self.data.y_train)


@dataclass(frozen=True)
class ServerContext:
    """What a server hook may use: config, round, training population, a model factory, seeded RNGs.

    The engine builds it (``fedmem.simulation``); a strategy never imports the data pipeline.
    """

    cfg: Config
    round: int  # 0 in ``init``
    clients: tuple[int, ...]  # partition ids of the clients that train in this federation
    model_factory: Callable[..., Backbone]  # (*keys) -> a fresh backbone, weights from (seed, *keys)

    @property
    def num_training_clients(self) -> int:
        """N: how many clients train in this federation (the population clients are sampled from)."""
        return len(self.clients)

    @property
    def seed(self) -> int:
        """The run's seed."""
        return self.cfg.seed

    def at(self, server_round: int) -> ServerContext:
        """This context at ``server_round``."""
        return dataclasses.replace(self, round=server_round)

    def new_model(self, *keys: int | str) -> Backbone:
        """A fresh backbone of the configured model for the run's data (weights from seed and ``keys``)."""
        return self.model_factory(*keys)

    def initial_weights(self, *keys: int | str) -> Weights:
        """The weights of :meth:`new_model` (``keys`` give further independent models: IFCA's clusters)."""
        return get_weights(self.new_model(*keys))

    def rng(self, purpose: str) -> np.random.Generator:
        """A numpy generator keyed by (seed, purpose, round)."""
        return derive_rng(self.cfg.seed, purpose, self.round)


class Predictor(Protocol):
    """A personalized predictor: class probabilities for inputs, plus what it chose (lambda, k...)."""

    info: Mapping[str, float]

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities (n, num_classes)."""
        ...


@runtime_checkable
class PositionwisePredictor(Protocol):
    """A predictor that is a function of one backbone's outputs at each position, nothing else.

    Exposure scoring runs ``model`` one character at a time over a tree of candidate secrets
    and asks for the probabilities at each node; predictors that are not of this form
    (APFL's mixture of two models) are scored on whole windows with ``predict`` instead.
    """

    model: Backbone

    def from_outputs(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (n, C) from the model's logits (n, C) and embeddings (n, D) at n positions."""
        ...


@runtime_checkable
class OracleReporter(Protocol):
    """A predictor that can say how well it would do with hyperparameters tuned on the data it is given.

    Evaluation reports this beside the honest (validation-tuned) accuracy, labelled as an oracle,
    so papers that tuned on test can be compared with; it never selects anything.
    """

    def oracle_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Best accuracy over the predictor's grid, tuned on (x, y)."""
        ...


@dataclass
class ModelPredictor:
    """Predict with a backbone's softmax."""

    model: Backbone
    batch_size: int = 256
    info: Mapping[str, float] = field(default_factory=dict)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        logits, _ = logits_and_embeddings(self.model, x, self.batch_size)
        return softmax(logits)

    def from_outputs(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (n, C) from the backbone's logits (n, C) at n positions."""
        return softmax(logits)


@dataclass(frozen=True)
class Update:
    """What a client's ``fit`` returns: the arrays it uploads, its metrics, its averaging weight."""

    arrays: Arrays
    metrics: Mapping[str, float]
    num_examples: int


@dataclass(frozen=True)
class Uploads:
    """What a strategy's ``fit`` uploads: the names of ``Update.arrays``, checked on every upload.

    Client-level DP (``fedmem.privacy.ClientDP``) protects only uploads that every client makes
    of the same names, each a name the server broadcasts (it clips each client's change from what
    it received and noises the mean); it refuses every other declaration.
    """

    names: tuple[str, ...] = (MODEL,)
    every_client: bool = True  # False: each client uploads some of ``names`` (IFCA: one cluster of K)
    note: str = ""  # why DP cannot protect these uploads, in the strategy's words (worded into the refusal)

    def violation(self, uploaded: Sequence[str]) -> str:
        """What is wrong with a client's ``uploaded`` names against this declaration ("" if nothing)."""
        extra = sorted(set(uploaded) - set(self.names))
        if extra:
            declared = ", ".join(self.names) or "nothing"
            return f"uploaded {extra[0]!r}, which its uploads() do not declare ({declared})"
        missing = sorted(set(self.names) - set(uploaded)) if self.every_client else []
        if missing:
            return f"did not upload {missing[0]!r}, which its uploads() declare every client uploads"
        return ""


@dataclass(frozen=True)
class Reply:
    """One client's training reply, as the server's aggregate hook sees it."""

    pid: int
    num_examples: int
    arrays: Arrays
    metrics: Mapping[str, float]


class Strategy:
    """Base class: FedAvg's hooks. Subclasses set ``name``, ``summary`` and override hooks.

    Parameters
    ----------
    cfg:
        The run's config. ``self.params`` is this strategy's ``[strategy.<name>]`` table parsed
        into its ``Params`` dataclass (defaults when the table is absent).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `fedmem strategies`
    title: ClassVar[str] = ""  # how tables and figures name it ("kNN-Per") and, by default, its predictor
    predictor_title: ClassVar[str] = ""  # its own predictor's name where it differs ("fine-tuned")
    # a personalizer of whatever model it is handed: after a personal strategy, "<its title> + <title>"
    on_any_model: ClassVar[bool] = False
    label: ClassVar[str] = "global"  # results key of this strategy's own predictor
    reports_global: ClassVar[bool] = False  # also evaluate the received global model ("global")
    adapts: ClassVar[bool] = False  # personalizes by local steps: eval.adapt_steps reports "<label>@<k>"
    # Its server state comes from averages of uploads, taken through :meth:`average` (so
    # update.aggregate applies); False refuses a robust update.aggregate.
    averages_uploads: ClassVar[bool] = True
    # Its local steps take their cross-entropy gradient from :meth:`local_gradient` (so
    # strategy.gradient applies); False refuses a coherent-gradient strategy.gradient.
    robust_gradients: ClassVar[bool] = True
    # why sample-level DP-SGD (strategy.gradient = "dpsgd") would not cover this strategy's uploads;
    # "" = it does (everything uploaded is computed from DP-SGD steps and public values)
    not_sample_private: ClassVar[str] = ""
    Params: ClassVar[type[Any]] = NoParams

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.params = self.parse_params(cfg)

    @classmethod
    def parse_params(cls, cfg: Config) -> Any:
        """This strategy's ``[strategy.<name>]`` table as its ``Params`` (a ConfigError if invalid)."""
        return build_dataclass(cls.Params, cfg.strategy.params.get(cls.name, {}), f"strategy.{cls.name}.")

    # ------------------------------------------------------------------ server side

    def uploads(self) -> Uploads:
        """What :meth:`fit` uploads (default: the model, from every client); see :class:`Uploads`."""
        return Uploads()

    def check(self, ctx: ServerContext) -> None:
        """Refuse, with a ConfigError, what this strategy cannot run with (called once, before a run).

        For checks that need the model or the population (FedBN needs BatchNorm layers); checks of
        ``[strategy.<name>]`` values belong on the ``Params`` fields.
        """

    def init(self, model: Weights, ctx: ServerContext) -> Arrays:
        """The initial server state from the initial model's weights."""
        return {MODEL: model}

    def broadcast(self, state: Arrays, server_round: int) -> Arrays:
        """What clients receive this round: the state minus the server's private names."""
        return {k: v for k, v in state.items() if not k.startswith(PRIVATE)}

    def aggregate(
        self, state: Arrays, replies: Sequence[Reply], ctx: ServerContext
    ) -> tuple[Arrays, Mapping[str, float]]:
        """The next state and server metrics from the replies (sorted by partition id).

        FedAvg: each uploaded name's arrays are averaged, weighted by the clients' example
        counts, key by key; keys nobody uploaded keep their value.
        """
        return merge_average(state, [(r.arrays, r.num_examples) for r in replies], self.average), {}

    def average(self, weights: Sequence[Mapping[str, np.ndarray]], counts: Sequence[float]) -> Weights:
        """THE combination of client uploads every averaging aggregate goes through (``update.aggregate``).

        The example-weighted mean by default; the unweighted coordinate-wise median or trimmed
        mean (Yin et al., ICML 2018) when configured.
        """
        u = self.cfg.update
        return aggregate_uploads(weights, counts, u.aggregate, u.trim_fraction)

    # ------------------------------------------------------------------ client side

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        """Train ``model`` (holding the received global model) and choose what to upload."""
        stats = self.train(model, ctx)
        return Update({MODEL: get_weights(model)}, stats.metrics(), ctx.num_train)

    def train(
        self,
        model: nn.Module,
        ctx: ClientContext,
        *,
        settings: SGDSettings | None = None,
        parameters: Sequence[nn.Parameter] | None = None,
        step: Step | None = None,
        purpose: str = "fit",
    ) -> TrainStats:
        """THE training loop on the client's train split with this strategy's step (see :meth:`make_step`)."""
        return train(
            model,
            ctx.data.x_train,
            ctx.data.y_train,
            settings or ctx.sgd(),
            ctx.rng(purpose),
            step=step or self.make_step(model, ctx),
            parameters=parameters,
        )

    def make_step(self, model: nn.Module, ctx: ClientContext) -> Step:
        """The step :meth:`fit` trains with: the run's loss (``ctx.loss()``) + :meth:`extra_loss`, one step.

        Override to replace the step (it gets the model, the batch, a function drawing further
        batches and the optimizer, and returns the batch loss after updating the model).
        """
        return cross_entropy_step(self.extra_loss(model, ctx), self.local_gradient(ctx), ctx.loss())

    def local_gradient(self, ctx: ClientContext, purpose: str = "fit") -> Gradient | None:
        """``strategy.gradient``'s rule on ``strategy.loss`` for local steps (None: the plain mean).

        ``dpsgd`` draws its noise from ``ctx.torch_rng("dpsgd")`` (other purposes: ``"dpsgd/<purpose>"``):
        a strategy that trains twice in one ``fit`` (FedRep's head phase, Ditto's personal model)
        passes the train call's ``purpose`` so that the two never share noise.
        """
        s = self.cfg.strategy
        key = "dpsgd" if purpose == "fit" else f"dpsgd/{purpose}"
        generator = ctx.torch_rng(key) if s.gradient == "dpsgd" else None
        return gradient_rule(
            s.gradient,
            s.winsor_c,
            training_loss(s),
            dp_clip=s.dp_clip,
            dp_noise=s.dp_noise,
            generator=generator,
        )

    def dp_steps(self, examples: int) -> int:
        """DP-SGD steps one ``fit`` runs on ``examples`` train examples before it uploads.

        ``sample_epsilon`` counts these per round: the ``[strategy]`` schedule by default; a
        strategy whose upload depends on more local steps (FedRep's head phase) adds them.
        """
        s = self.cfg.strategy
        return steps_per_fit(examples, s.batch_size, s.local_epochs, s.local_steps)

    def extra_loss(self, model: nn.Module, ctx: ClientContext) -> ExtraLoss | None:
        """A term added to every mini-batch loss of the default step (None: the loss alone)."""
        return None

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        """The model this client deploys, given the received global model (FedAvg: the global one).

        May modify and return ``model``.
        """
        return model

    def personalize(self, model: Backbone, ctx: ClientContext) -> Predictor:
        """Turn the client's model into its personalized predictor; must not modify ``model``.

        ``ctx.data`` holds the train and validation splits only.
        """
        return ModelPredictor(model, self.cfg.eval.batch_size)

    def adapted(self, model: Backbone, ctx: ClientContext, steps: int) -> Predictor:
        """The predictor after exactly ``steps`` local steps from ``model`` (0: ``model`` as is).

        Only for strategies with ``adapts``: ``eval.adapt_steps`` reports each as ``<label>@<steps>``,
        an adaptation curve from one federation. Must not modify ``model``.
        """
        raise NotImplementedError(f"{self.name} does not personalize by local steps")


def average_of(replies: Sequence[Reply], name: str = MODEL, average: Averager = weighted_average) -> Weights:
    """The replies' ``name`` arrays averaged with FedAvg's example weights (server optimizers' input).

    Strategies pass their :meth:`Strategy.average` as ``average`` so that ``update.aggregate`` applies.
    """
    return average([r.arrays[name] for r in replies], [r.num_examples for r in replies])


def set_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
    """Load numpy weights into ``model`` (strict: every key must match; else a subset of keys)."""
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}
    if strict:
        model.load_state_dict(state, strict=True)
        return
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise KeyError(f"{unknown[0]} is not a key of the model")
    model.load_state_dict({**model.state_dict(), **state}, strict=True)


def clone(model: Backbone) -> Backbone:
    """A deep copy of ``model`` (a personal model started from the global one)."""
    return copy.deepcopy(model)


# --------------------------------------------------------------------------- shared by several strategies

PERSONAL = "personal"  # the per-client file of a personalized strategy's own model


def load_personal(model: Backbone, ctx: ClientContext) -> Backbone | None:
    """A copy of ``model`` holding this client's saved personal weights, or None if it saved none.

    Ditto, APFL and pFedMe each keep one personal backbone per client.
    """
    state = ctx.load(PERSONAL)
    if state is None:
        return None
    personal = clone(model)
    personal.load_state_dict(state)
    return personal


@contextmanager
def frozen(parameters: list[nn.Parameter]) -> Iterator[None]:
    """Stop gradients to ``parameters`` inside the block (no wasted backward through a frozen part)."""
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)
