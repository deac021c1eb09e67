"""pFedMe (Dinh, Tran and Nguyen, "Personalized Federated Learning with Moreau Envelopes", NeurIPS 2020).

Each client's personal model theta solves the inner (Moreau envelope) problem

    min_theta f(theta) + lam / 2 * ||theta - w||^2

around its local copy w of the global model. Per mini-batch: from the current
theta (w at the start of ``fit``), K = ``inner_steps`` gradient steps of size
``personal_lr`` on that objective with the batch's loss as f (cross-entropy, or ``strategy.loss``); then

    w <- w - eta * lam * (w - theta),   eta = the local learning rate,

a plain update under ``no_grad`` (lam * (w - theta) is the gradient of the
envelope at w; no momentum, as in the paper and its code). The client uploads w
and keeps theta as its personal model; the server sets
w <- (1 - beta) * w + beta * (example-weighted average), beta = 1 being FedAvg.

As lam -> infinity (with the inner problem solved) theta -> w - grad f(w) / lam and
the w update becomes one SGD step of size eta. BatchNorm (not in the paper): theta's
running statistics follow its forward passes and w's floating buffers get the same
pull towards theta's. A client that never trained runs this local procedure from the
received global model at evaluation, without saving, and predicts with its theta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmem.config import setting
from fedmem.models import Backbone
from fedmem.strategy import (
    MODEL,
    PERSONAL,
    ClientContext,
    Reply,
    ServerContext,
    Strategy,
    Update,
    clone,
    get_weights,
    load_personal,
)
from fedmem.training import Batch, Draw, LossFn, Step
from fedmem.updates import Arrays, is_float, merge_average


class PFedMeStep:
    """The pFedMe step on w (the trained module); holds theta across the batches of one ``fit``."""

    def __init__(
        self,
        model: Backbone,
        lam: float,
        inner_steps: int,
        personal_lr: float,
        lr: float,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        self.theta = clone(model)  # (theta starts at w at the start of fit)
        self.lam, self.inner_steps, self.personal_lr, self.lr = lam, inner_steps, personal_lr, lr
        self.loss_fn = loss_fn  # f of the inner problem: the run's strategy.loss

    def __call__(
        self, model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        x, y = batch
        thetas, ws = list(self.theta.parameters()), [w.detach() for w in model.parameters()]
        self.theta.train()
        for _ in range(self.inner_steps):
            loss = self.loss_fn(self.theta(x), y)
            grads = torch.autograd.grad(loss, thetas)
            with torch.no_grad():
                for theta, w, g in zip(thetas, ws, grads, strict=True):
                    theta.sub_(self.personal_lr * (g + self.lam * (theta - w)))
        with torch.no_grad():
            personal = self.theta.state_dict()
            for key, w in model.state_dict().items():
                if w.is_floating_point():
                    w.sub_(self.lr * self.lam * (w - personal[key]))
        return loss.detach()  # theta's batch loss at the last inner step: the personal training loss


class PFedMe(Strategy):
    """Bi-level personalization: theta solves a Moreau-envelope problem around the local w each batch."""

    name = "pfedme"
    title = "pFedMe"
    summary = "pFedMe: personal theta via a Moreau-envelope inner problem around w; server mixes with beta"
    label = "pfedme"
    reports_global = True
    robust_gradients = False  # its step solves an inner problem on theta, not one CE gradient step

    @dataclass(frozen=True)
    class Params:
        """``[strategy.pfedme]`` (lam = 15 and K = 5 as in the paper's MNIST experiments)."""

        # pull of theta towards w in the inner problem
        lam: float = setting(15.0, "(0, inf)")
        inner_steps: int = setting(5, "[1, inf)")  # K, gradient steps on the inner problem per mini-batch
        # step size of the inner problem
        personal_lr: float = setting(0.01, "(0, inf)")
        # server mixing: w <- (1 - beta) w + beta * average (1 = FedAvg)
        beta: float = setting(1.0, "(0, inf)")

    def aggregate(
        self, state: Arrays, replies: Sequence[Reply], ctx: ServerContext
    ) -> tuple[Arrays, Mapping[str, float]]:
        averaged = merge_average(state, [(r.arrays, r.num_examples) for r in replies], self.average)
        beta = self.params.beta
        out: Arrays = {name: dict(weights) for name, weights in averaged.items()}
        for name in sorted({n for r in replies for n in r.arrays}):
            for key, avg in averaged[name].items():
                if is_float(avg):
                    old = state[name][key].astype(np.float64)
                    out[name][key] = ((1 - beta) * old + beta * avg.astype(np.float64)).astype(avg.dtype)
        return out, {}

    def _step(self, model: Backbone, ctx: ClientContext) -> PFedMeStep:
        p = self.params
        return PFedMeStep(model, p.lam, p.inner_steps, p.personal_lr, ctx.sgd().lr, ctx.loss())

    def make_step(self, model: nn.Module, ctx: ClientContext) -> Step:
        assert isinstance(model, Backbone)
        return self._step(model, ctx)

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        step = self._step(model, ctx)
        stats = self.train(model, ctx, step=step)
        ctx.save(PERSONAL, step.theta.state_dict())
        return Update({MODEL: get_weights(model)}, stats.metrics(), ctx.num_train)

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        saved = load_personal(model, ctx)
        if saved is not None:
            return saved
        step = self._step(model, ctx)  # cold start: the local procedure, not saved
        self.train(model, ctx, step=step)
        return step.theta
