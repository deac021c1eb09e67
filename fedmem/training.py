"""THE local training and evaluation loop.

Strategies never write their own loop. They add a term to the loss
(``extra_loss``: FedProx's proximal term), choose which parameters to optimise
(FedRep's head / body phases), or replace the *step*: a function that gets the
model, the mini-batch, a function drawing further mini-batches and the
optimizer, updates the model and returns the batch loss (APFL's two models,
pFedMe's inner problem, SCAFFOLD's corrected gradient). Batches are drawn by
indexing tensors already in memory with a permutation from a seeded generator:
no DataLoader worker processes, no global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmem.models import Backbone

ExtraLoss = Callable[[nn.Module], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> mean loss
Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, ...) and labels (B,)
Draw = Callable[[], Batch]
Step = Callable[[nn.Module, Batch, Draw, torch.optim.Optimizer], torch.Tensor]


@dataclass(frozen=True)
class SGDSettings:
    """The local optimizer: SGD with momentum and weight decay, for epochs or a fixed number of steps."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 1
    steps: int = 0  # > 0 overrides epochs
    batch_size: int = 32


@dataclass(frozen=True)
class TrainStats:
    """What one call of :func:`train` did."""

    loss: float  # mean training loss over the examples seen
    samples: int  # examples processed (counting repeats)
    steps: int

    def metrics(self) -> dict[str, float]:
        """The figures a client reports after ``fit``."""
        return {"loss": self.loss, "steps": float(self.steps)}


def _batches(n: int, settings: SGDSettings, rng: np.random.Generator) -> Iterable[np.ndarray]:
    """Index batches: ``epochs`` shuffled passes, or ``steps`` batches from successive shuffles."""
    if settings.steps > 0:
        done = 0
        while done < settings.steps:
            perm = rng.permutation(n)
            for start in range(0, n, settings.batch_size):
                if done == settings.steps:
                    return
                yield perm[start : start + settings.batch_size]
                done += 1
        return
    for _ in range(settings.epochs):
        perm = rng.permutation(n)
        for start in range(0, n, settings.batch_size):
            yield perm[start : start + settings.batch_size]


def cross_entropy_step(extra_loss: ExtraLoss | None = None, loss_fn: LossFn = F.cross_entropy) -> Step:
    """The default step: mean ``loss_fn`` (+ ``extra_loss``), one optimizer step; returns the loss.

    ``loss_fn`` is cross-entropy unless the run chose another ``strategy.loss`` (:mod:`fedmem.losses`).
    """

    def step(model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        x, y = batch
        loss = loss_fn(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _drawer(x: torch.Tensor, y: torch.Tensor, batch_size: int, rng: np.random.Generator) -> Draw:
    """Random mini-batches (without replacement inside a batch) from a generator of their own."""
    n = len(y)

    def draw() -> Batch:
        index = torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))
        return x[index], y[index]

    return draw


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: SGDSettings,
    rng: np.random.Generator,
    *,
    extra_loss: ExtraLoss | None = None,
    step: Step | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> TrainStats:
    """Train ``model`` in place with SGD, one ``step`` per mini-batch.

    Parameters
    ----------
    model:
        The model to train.
    x, y:
        Training inputs (n, ...) float32 and labels (n,) int64.
    settings:
        Optimizer and schedule.
    rng:
        Shuffling generator, derived from (seed, purpose, round, client). Batches a step
        draws itself come from a child of it, so they never shift the shuffling.
    extra_loss:
        Added to each mini-batch's mean loss by the default step (e.g. a proximal term).
    step:
        Replaces the default :func:`cross_entropy_step` (then ``extra_loss`` must be None).
    parameters:
        Parameters to optimise; all of the model's by default.
    loss_fn:
        The default step's mini-batch loss (``strategy.loss``, see :mod:`fedmem.losses`).
    """
    if step is not None and extra_loss is not None:
        raise ValueError("pass either step or extra_loss: a custom step adds its own terms")
    n = len(y)
    if n == 0:
        return TrainStats(loss=math.nan, samples=0, steps=0)
    params = list(model.parameters() if parameters is None else parameters)
    optimizer = torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    run_step = step or cross_entropy_step(extra_loss, loss_fn)
    draw = _drawer(x, y, settings.batch_size, rng.spawn(1)[0])
    model.train()
    total, seen, steps = 0.0, 0, 0
    for idx in _batches(n, settings, rng):
        index = torch.from_numpy(idx)
        loss = run_step(model, (x[index], y[index]), draw, optimizer)
        total += float(loss) * len(idx)
        seen += len(idx)
        steps += 1
    # no step at all (0 epochs, an empty split): there is no training loss to report
    return TrainStats(loss=total / seen if seen else math.nan, samples=seen, steps=steps)


@torch.inference_mode()
def logits_and_embeddings(
    model: Backbone, x: torch.Tensor, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, num_classes, *positions) and embeddings (n, embedding_dim, *positions), float32 numpy.

    Images have no position axes; a next-character model has one (see :mod:`fedmem.models`).
    """
    model.eval()
    logits, embeddings = [], []
    for start in range(0, len(x), batch_size):
        z = model.features(x[start : start + batch_size])
        embeddings.append(z)
        logits.append(model.head(z))
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0, model.embedding_dim), np.float32)
    return torch.cat(logits).numpy(), torch.cat(embeddings).numpy()


def to_rows(a: np.ndarray) -> np.ndarray:
    """One row per prediction: (n, C, *positions) -> (n * prod(positions), C); (n, C) is unchanged.

    Row ``i * P + t`` is example ``i`` at position ``t``, the order of ``labels.reshape(-1)``.
    """
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) if a.ndim > 2 else a


def from_rows(rows: np.ndarray, like: tuple[int, ...]) -> np.ndarray:
    """Undo :func:`to_rows`: rows (n * P, C') back to (n, C', *positions) of an array shaped ``like``."""
    if len(like) <= 2:
        return rows
    return np.moveaxis(rows.reshape(like[0], *like[2:], rows.shape[1]), -1, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (the class axis), in float64 (stable)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions (rows, or rows x positions) whose argmax over axis 1 is the label.

    NaN for no predictions.
    """
    if len(labels) == 0:
        return math.nan
    return float(np.mean(np.argmax(probabilities, axis=1) == labels))
