"""Ditto (Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021).

Each client solves two problems in a round. The global model w is trained as in
FedAvg and uploaded. The personal model v, kept on the client, minimises

    F_k(v) + lam / 2 * ||v - w^t||^2,

with w^t the global model received this round, for the same local schedule.
Here the proximal pull is applied after each optimizer step on F_k in its
implicit (proximal) form

    v <- (v + eta * lam * w^t) / (1 + eta * lam),   eta = the local learning rate,

which is unconditionally stable (a convex combination of v and w^t for any
lam >= 0) and tends to w^t exactly as lam -> infinity. It equals the paper's
explicit step v - eta * lam * (v - w^t) to first order in eta * lam; the
optimizer's momentum sees only the gradient of F_k.

A client that never trained (held out, or not yet sampled) runs the same
personal training from the received global model on its train split at
evaluation, without saving it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedmem.models import Backbone
from fedmem.strategy import (
    MODEL,
    PERSONAL,
    ClientContext,
    Strategy,
    Update,
    clone,
    get_weights,
    load_personal,
)
from fedmem.training import Batch, Draw, Gradient, LossFn, Step, mean_gradient


def proximal_step(
    anchor: nn.Module, pull: float, loss_fn: LossFn = F.cross_entropy, gradient: Gradient | None = None
) -> Step:
    """SGD step on ``loss_fn`` (``strategy.loss``), then ``v <- v + pull * (w - v)`` towards ``anchor`` (w).

    ``pull = eta * lam / (1 + eta * lam)`` makes this the implicit proximal step; ``pull = 0``
    leaves the optimizer step untouched (``lerp`` with weight 0 returns ``v`` exactly).
    ``gradient``: the loss's gradient rule (``strategy.gradient``, built on ``loss_fn``; None = the mean).
    """
    targets = list(anchor.parameters())
    compute = gradient or mean_gradient(loss_fn)

    def step(model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = compute(model, batch, draw)
        optimizer.step()
        with torch.no_grad():
            for v, w in zip(model.parameters(), targets, strict=True):
                v.lerp_(w, pull)
        return loss

    return step


class Ditto(Strategy):
    """FedAvg for the global model plus a personal model pulled towards it, trained on each client."""

    name = "ditto"
    title = "Ditto"
    summary = "Ditto: FedAvg global model + personal model regularised towards it (lam); predicts with it"
    label = "ditto"
    reports_global = True

    @dataclass(frozen=True)
    class Params:
        """``[strategy.ditto]``."""

        lam: float = 0.1  # lambda, the pull of the personal model towards the global one (paper grid 0.01..2)

    def _personal(self, model: Backbone, ctx: ClientContext, start: Backbone) -> tuple[Backbone, float]:
        """Train personal model ``start`` with the pull towards ``model`` (the received w); its loss."""
        eta = ctx.sgd().lr
        pull = eta * self.params.lam / (1.0 + eta * self.params.lam)
        step = proximal_step(model, pull, ctx.loss(), self.local_gradient(ctx, PERSONAL))
        stats = self.train(start, ctx, step=step, purpose=PERSONAL)
        return start, stats.loss

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        received = clone(model)  # w^t, the anchor of the personal problem
        stats = self.train(model, ctx)  # the global model's update is exactly FedAvg's
        personal, loss = self._personal(received, ctx, load_personal(received, ctx) or clone(received))
        ctx.save(PERSONAL, personal.state_dict())
        return Update({MODEL: get_weights(model)}, {**stats.metrics(), "personal_loss": loss}, ctx.num_train)

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        saved = load_personal(model, ctx)
        if saved is not None:
            return saved
        return self._personal(model, ctx, clone(model))[0]  # cold start, not saved
