"""The Strategy base: client hooks (fit, client_model, personalize) and a server hook (aggregate).

A strategy is a small object holding its hyperparameters; the engine owns the
round loop and the local training loop and calls these hooks. The defaults are
FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017): train the received model locally with SGD,
average the replies weighted by the number of training examples, predict with
the model as is. A strategy overrides only what differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from fedmem.config import Config, NoParams
from fedmem.errors import FederationError
from fedmem.models import Backbone, build_model
from fedmem.seeding import rng as derive_rng
from fedmem.training import ExtraLoss, SGDSettings, logits_and_embeddings, softmax, train

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientData:
    """One client's three splits as float32 tensors (n, C, H, W) and int64 labels (n,)."""

    pid: int
    seen: bool  # False for clients held out of training
    num_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def in_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class ClientContext:
    """What a client hook may use: config, its data, its round, its RNGs and its directory."""

    cfg: Config
    pid: int
    round: int
    data: ClientData

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator keyed by (seed, purpose, round, client id)."""
        return derive_rng(self.cfg.seed, purpose, self.round, self.pid)

    @property
    def state_dir(self) -> Path:
        """Directory for this client's large per-client objects (personal models), inside the run."""
        if not self.cfg.runtime.run_dir:
            raise FederationError("this strategy keeps per-client files but runtime.run_dir is not set")
        return Path(self.cfg.runtime.run_dir) / "clients" / f"{self.pid:05d}"

    def new_model(self) -> Backbone:
        """A fresh backbone of the configured architecture (weights from the run seed)."""
        m = self.cfg.model
        return build_model(m.name, self.data.in_shape, self.data.num_classes, m.embedding_dim, self.cfg.seed)

    def sgd(self) -> SGDSettings:
        """The local optimizer settings of ``[strategy]``."""
        s = self.cfg.strategy
        return SGDSettings(s.lr, s.momentum, s.weight_decay, s.local_epochs, s.local_steps, s.batch_size)


class Predictor(Protocol):
    """A personalized predictor: class probabilities for inputs, plus what it chose (lambda, k...)."""

    info: Mapping[str, float]

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Probabilities (n, num_classes)."""
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


@dataclass(frozen=True)
class Reply:
    """One client's training reply, as the server's aggregate hook sees it."""

    pid: int
    num_examples: int
    weights: Weights
    metrics: Mapping[str, float]


class Strategy:
    """Base class: FedAvg's hooks. Subclasses set ``name``, ``summary`` and override hooks.

    Parameters
    ----------
    cfg:
        The run's config; ``cfg.strategy.params`` is an instance of ``Params``.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `fedmem strategies`
    label: ClassVar[str] = "global"  # results key of this strategy's own predictor
    Params: ClassVar[type[Any]] = NoParams

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ client side

    def fit(self, model: Backbone, ctx: ClientContext) -> Mapping[str, float]:
        """Train ``model`` (holding the received global weights) in place; return metrics."""
        stats = train(
            model,
            ctx.data.x_train,
            ctx.data.y_train,
            ctx.sgd(),
            ctx.rng("fit"),
            extra_loss=self.extra_loss(model, ctx),
        )
        return {"loss": stats.loss, "steps": float(stats.steps)}

    def extra_loss(self, model: Backbone, ctx: ClientContext) -> ExtraLoss | None:
        """A term added to every mini-batch loss of :meth:`fit` (None: plain cross-entropy)."""
        return None

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        """The model this client deploys, given the received global model (FedAvg: the global one)."""
        return model

    def personalize(self, model: Backbone, ctx: ClientContext) -> Predictor:
        """Turn the client's model into its personalized predictor; must not modify ``model``."""
        return ModelPredictor(model, self.cfg.eval.batch_size)

    # ------------------------------------------------------------------ server side

    def aggregate(self, current: Weights, replies: Sequence[Reply]) -> Weights:
        """New global weights from the replies (sorted by partition id). FedAvg: weighted mean."""
        return weighted_average([r.weights for r in replies], [r.num_examples for r in replies])


def weighted_average(weights: Sequence[Weights], counts: Sequence[int]) -> Weights:
    """Average state dicts weighted by ``counts``, accumulating in float64.

    Floating arrays are averaged; integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are taken from the first entry, since their mean
    has no meaning.
    """
    if not weights:
        raise ValueError("weighted_average needs at least one state dict")
    if len(weights) != len(counts):
        raise ValueError(f"{len(weights)} state dicts but {len(counts)} counts")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total count")
    out: Weights = {}
    for key, first in weights[0].items():
        if not np.issubdtype(first.dtype, np.floating):
            out[key] = first.copy()
            continue
        acc = np.zeros(first.shape, np.float64)
        for w, c in zip(weights, counts, strict=True):
            acc += w[key].astype(np.float64) * (c / total)
        out[key] = acc.astype(first.dtype)
    return out


def get_weights(model: torch.nn.Module) -> Weights:
    """The model's state dict as numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load numpy weights into ``model`` (strict: every key must match)."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)
