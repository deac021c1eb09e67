"""THE local training and evaluation loop.

Strategies never write their own loop. They add a term to the loss
(``extra_loss``: FedProx's proximal term), choose which parameters to optimise
(FedRep's head / body phases), or replace the *step*: a function that gets the
model, the mini-batch, a function drawing further mini-batches and the
optimizer, updates the model and returns the batch loss (APFL's two models,
pFedMe's inner problem, SCAFFOLD's corrected gradient). Batches are drawn by
indexing tensors already in memory with a permutation from a seeded generator:
no DataLoader worker processes, no global RNG.

How a step's cross-entropy gradient is formed is a :data:`Gradient` of its own
(``strategy.gradient``), after Chatterjee, "Coherent Gradients: An Approach to
Understanding Generalization in Gradient Descent-based Optimization" (ICLR 2020) and
Zielinski, Krishnan and Chatterjee, "Explaining Memorization and Generalization: A
Large-Scale Study with Coherent Gradients" (arXiv:2003.07422): directions that few
examples agree on drive memorization, and two cheap changes to SGD suppress them.
``winsorized`` clips every coordinate of the per-example gradients to its c-th smallest
and largest value across the batch before averaging; ``median3`` takes the
coordinate-wise median of the gradients of three mini-batches (the loop's and two from
``draw()``) for one step. ``mean`` (None) is plain backpropagation of the batch mean.

``dpsgd`` is sample-level differential privacy inside local training (Abadi, Chu, Goodfellow,
McMahan, Mironov, Talwar and Zhang, "Deep Learning with Differential Privacy", CCS 2016,
Algorithm 1): each example's gradient is clipped to an L2 norm of at most C, the clipped
gradients are summed, Gaussian noise N(0, (z C)^2 I) from a seeded generator is added and the
sum is divided by the batch size. It is a rule on the same per-example gradients, not a wrapped
optimizer: Opacus' DPOptimizer would overwrite the gradients that extra terms and SCAFFOLD's
correction add after the rule (``docs/privacy.md`` says what else it would need).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn import functional as F

from fedmem.models import Backbone

ExtraLoss = Callable[[nn.Module], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (B, ...) and labels (B,)
Draw = Callable[[], Batch]
Step = Callable[[nn.Module, Batch, Draw, torch.optim.Optimizer], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> mean loss
# Sets ``.grad`` of the model's trainable parameters (requires_grad) from the batch's
# loss (``strategy.loss``) and returns the batch loss, detached; the caller zeroes and steps.
Gradient = Callable[[nn.Module, Batch, Draw], torch.Tensor]
GRADIENTS = ("mean", "winsorized", "median3", "dpsgd")  # strategy.gradient's choices


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


def cross_entropy_step(
    extra_loss: ExtraLoss | None = None, gradient: Gradient | None = None, loss_fn: LossFn = F.cross_entropy
) -> Step:
    """The default step: mean ``loss_fn`` (+ ``extra_loss``), one optimizer step; returns the loss.

    ``loss_fn`` is cross-entropy unless the run chose another ``strategy.loss`` (:mod:`fedmem.losses`;
    a ``gradient`` rule is built with the same loss). ``gradient`` replaces the loss's gradient
    (see :func:`gradient_rule`); the gradient of ``extra_loss`` is added to it unchanged. A term
    that is the same for every example (FedProx's) commutes with winsorizing and with the median,
    so this equals the rule applied to the whole loss.
    """
    if gradient is None:

        def step(
            model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer
        ) -> torch.Tensor:
            x, y = batch
            loss = loss_fn(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        return step

    def robust_step(
        model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = gradient(model, batch, draw)
        if extra_loss is not None:
            extra = extra_loss(model)
            extra.backward()  # accumulates onto the rule's gradient
            loss = loss + extra.detach()
        optimizer.step()
        return loss

    return robust_step


def mean_gradient(loss_fn: LossFn = F.cross_entropy) -> Gradient:
    """The plain gradient: backpropagation of the batch's mean ``loss_fn``."""

    def gradient(model: nn.Module, batch: Batch, draw: Draw) -> torch.Tensor:
        x, y = batch
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss.detach()

    return gradient


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def _set_gradients(params: Mapping[str, nn.Parameter], grads: Mapping[str, torch.Tensor]) -> None:
    for k, p in params.items():
        # empty_like keeps the parameter's memory layout, which backward() later accumulates into
        p.grad = torch.empty_like(p).copy_(grads[k].detach())


def per_example_obstacle(model: nn.Module) -> str | None:
    """Why per-example gradients of ``model`` are not available, or None when they are.

    BatchNorm's training-mode output of one example depends on the rest of its batch, so the
    batch loss has no per-example gradients (Opacus refuses it for the same reason); and
    ``torch.func.vmap`` has no batching rule for recurrent layers (nn.GRU, nn.LSTM, nn.RNN).
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "it has BatchNorm layers, whose batch statistics mix the examples of a batch"
        if isinstance(m, nn.RNNBase):
            return f"torch.func.vmap cannot batch its recurrent layer ({type(m).__name__})"
    return None


def per_example_gradients(
    model: nn.Module, batch: Batch, loss_fn: LossFn = F.cross_entropy
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses (B,) and gradients {name: (B, *shape)} of the trainable parameters.

    Each example's loss is its mean ``loss_fn`` (over positions for text), so the mean of
    the rows is the batch gradient. One ``vmap(grad(...))`` over ``functional_call`` with the
    frozen parameters and the buffers passed through unchanged.
    """
    obstacle = per_example_obstacle(model)
    if obstacle is not None:
        raise ValueError(f"per-example gradients are not available for this model: {obstacle}")
    x, y = batch
    trainable = {k: p.detach() for k, p in _trainable(model).items()}
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**params, **frozen, **buffers}, (xi.unsqueeze(0),))
        return loss_fn(logits, yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(loss_of), in_dims=(None, 0, 0))(trainable, x, y)
    return losses, grads


def winsorize(rows: torch.Tensor, c: int) -> torch.Tensor:
    """Clip every coordinate of ``rows`` (B, ...) to its c-th smallest and c-th largest value over B.

    c = 0 leaves ``rows`` as they are. A batch too small for c (2c >= B, the last batch of an
    epoch) uses c = (B - 1) // 2, which leaves the median: the most the batch allows.
    """
    b = rows.shape[0]
    c = min(c, (b - 1) // 2)
    if c == 0:
        return rows
    # (N, B): each coordinate's B values side by side; topk along them was ~3x faster than
    # sorting along the batch axis of (B, ...) on the default CNN (per step, one thread)
    flat = rows.reshape(b, -1).T.contiguous()
    low = torch.topk(flat, c + 1, dim=1, largest=False).values[:, c:]  # c-th smallest (from 0), (N, 1)
    high = torch.topk(flat, c + 1, dim=1).values[:, c:]  # c-th largest
    return torch.clamp(flat, min=low, max=high).T.reshape(rows.shape)


def winsorized_gradient(c: int, loss_fn: LossFn = F.cross_entropy) -> Gradient:
    """The mean over the batch of the per-example gradients winsorized with ``c`` (Chatterjee, 2020)."""

    def gradient(model: nn.Module, batch: Batch, draw: Draw) -> torch.Tensor:
        losses, grads = per_example_gradients(model, batch, loss_fn)
        _set_gradients(_trainable(model), {k: winsorize(g, c).mean(dim=0) for k, g in grads.items()})
        return losses.mean()

    return gradient


def median3_gradient(loss_fn: LossFn = F.cross_entropy) -> Gradient:
    """The coordinate-wise median of the mean gradients of the loop's batch and two drawn ones (M3).

    Zielinski et al.'s M3: one optimizer step per three mini-batches' worth of gradients.
    Returns the loop's batch loss; BatchNorm statistics follow all three forward passes.
    """

    def gradient(model: nn.Module, batch: Batch, draw: Draw) -> torch.Tensor:
        params = _trainable(model)
        per_batch, loss = [], None
        for b in (batch, draw(), draw()):
            value = loss_fn(model(b[0]), b[1])
            per_batch.append(torch.autograd.grad(value, list(params.values())))
            loss = value.detach() if loss is None else loss
        assert loss is not None
        median = {k: torch.stack(gs).median(dim=0).values for k, *gs in zip(params, *per_batch, strict=True)}
        _set_gradients(params, median)
        return loss

    return gradient


def clip_per_example(grads: Mapping[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Scale each example's gradient {name: (B, *shape)} to an L2 norm of at most ``clip``.

    The norm is taken over all the tensors of one example jointly, and each row is divided by
    ``max(1, norm / clip)`` (Abadi et al., CCS 2016): rows within the bound are left exactly as
    they are, and a zero row stays zero.
    """
    scale = torch.clamp(per_example_norms(grads) / clip, min=1.0)  # (B,)
    return {k: g / scale.reshape(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}


def per_example_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each example's gradient L2 norm (B,), over all the tensors {name: (B, *shape)} jointly."""
    rows = next(iter(grads.values())).shape[0]
    return torch.as_tensor(sum(g.reshape(rows, -1).pow(2).sum(dim=1) for g in grads.values())).sqrt()


def dpsgd_gradient(
    clip: float, noise: float, generator: torch.Generator, loss_fn: LossFn = F.cross_entropy
) -> Gradient:
    """DP-SGD's noisy gradient (Abadi et al., CCS 2016, Algorithm 1) for one batch of B examples.

    ``(sum_i clip(g_i) + N(0, (noise * clip)^2 I)) / B`` on every trainable parameter, the
    noise drawn from ``generator`` parameter by parameter in the model's order (none when
    ``noise`` is 0). B is the batch's own size, so the last, smaller batch of an epoch is
    averaged over its examples. Returns the batch's mean loss (a diagnostic, not private).
    """

    def gradient(model: nn.Module, batch: Batch, draw: Draw) -> torch.Tensor:
        losses, grads = per_example_gradients(model, batch, loss_fn)
        clipped = clip_per_example(grads, clip)
        size = len(losses)
        noisy = {}
        for k, g in clipped.items():
            total = g.sum(dim=0)
            if noise > 0:
                draws = torch.randn(total.shape, generator=generator, dtype=total.dtype)
                total = total + draws.to(total.device) * (noise * clip)
            noisy[k] = total / size
        _set_gradients(_trainable(model), noisy)
        return losses.mean()

    return gradient


def gradient_rule(
    name: str,
    winsor_c: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    *,
    dp_clip: float = 1.0,
    dp_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Gradient | None:
    """The :data:`Gradient` of ``strategy.gradient`` = ``name`` on ``loss_fn``; None for ``"mean"``.

    ``dpsgd`` needs ``generator``: its noise must come from the client's seeded generator.
    """
    if name == "mean":
        return None
    if name == "winsorized":
        return winsorized_gradient(winsor_c, loss_fn)
    if name == "median3":
        return median3_gradient(loss_fn)
    if name == "dpsgd":
        if generator is None:
            raise ValueError("the dpsgd gradient draws its noise from a seeded generator: pass generator")
        return dpsgd_gradient(dp_clip, dp_noise, generator, loss_fn)
    raise ValueError(f"unknown gradient {name!r}; valid choices: {', '.join(GRADIENTS)}")


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
    run_step = step or cross_entropy_step(extra_loss, loss_fn=loss_fn)
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


def steps_per_fit(examples: int, batch_size: int, epochs: int, steps: int) -> int:
    """Local steps of one ``fit`` on ``examples`` train examples: ``steps``, or ``epochs`` passes.

    The schedule of ``fedmem.training._batches``: ``steps > 0`` wins, else ``epochs * ceil(n / B)``.
    """
    if examples == 0:
        return 0
    return steps if steps > 0 else epochs * math.ceil(examples / batch_size)
