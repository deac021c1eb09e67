"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), control variates of option II.

The server keeps the model ``x`` and a control variate ``c``; client ``i`` keeps its own
``c_i`` (zeros before it first trains). Each local step corrects the mini-batch gradient for
client drift, ``y <- y - eta * (g_i(y) + c - c_i)``, with plain SGD (momentum 0, as in the
paper; the learning rate, weight decay and schedule are ``[strategy]``'s). After ``K`` steps

    c_i+ = c_i - c + (x - y) / (K * eta),

which the client saves; it uploads ``y`` and ``c_i+ - c_i``. The server sets

    x <- x + server_lr * (example-weighted mean of y - x),
    c <- c + |S| / N * mean over replies of (c_i+ - c_i),

with ``N`` the number of training clients. ``c`` covers the model's parameters, not its
buffers. Every client predicts with the global model. ``update.aggregate`` replaces the mean of
the ``y`` (the model); ``c`` stays the mean of the control deltas, the estimate of the clients'
mean gradient that the correction needs. ``strategy.gradient`` replaces ``g_i(y)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmem.config import setting
from fedmem.errors import FederationError
from fedmem.models import Backbone
from fedmem.strategy import (
    MODEL,
    ClientContext,
    Reply,
    ServerContext,
    Strategy,
    Update,
    Uploads,
    average_of,
    get_weights,
)
from fedmem.training import Batch, Draw, Step, mean_gradient
from fedmem.updates import Arrays, Weights, global_norm, subtract, weighted_average

CONTROL = "c"  # the server's control variate, broadcast with the model
CONTROL_DELTA = "c_delta"  # a client's c_i+ - c_i, uploaded
OWN_CONTROL = "scaffold_c"  # the client's c_i, in its run-directory file


class Scaffold(Strategy):
    """Drift-corrected local SGD with server and client control variates."""

    name = "scaffold"
    title = "SCAFFOLD"
    summary = "SCAFFOLD: local SGD corrected by control variates (option II); all use the global model"

    @dataclass(frozen=True)
    class Params:
        """``[strategy.scaffold]``: ``server_lr`` (the paper's global step size eta_g; 1 = averaging)."""

        server_lr: float = setting(1.0, "(0, inf)")

    def uploads(self) -> Uploads:
        note = (
            "SCAFFOLD clients upload control-variate deltas (c_delta) that are neither clipped nor noised, "
            "and the server adds each one to its control variate"
        )
        return Uploads((MODEL, CONTROL_DELTA), note=note)

    def init(self, model: Weights, ctx: ServerContext) -> Arrays:
        keys = [name for name, _ in ctx.new_model().named_parameters()]  # not the buffers
        return {MODEL: model, CONTROL: {k: np.zeros_like(model[k]) for k in keys}}

    def aggregate(
        self, state: Arrays, replies: Sequence[Reply], ctx: ServerContext
    ) -> tuple[Arrays, Mapping[str, float]]:
        if not replies:
            return state, {}
        x, c = state[MODEL], state[CONTROL]
        average = average_of(replies, average=self.average)
        delta = subtract(average, x)  # float keys, float64
        lr = self.params.server_lr
        model = {k: (v + lr * delta[k]).astype(v.dtype) if k in delta else average[k] for k, v in x.items()}
        # Uniform mean of the clients' control deltas, scaled by the sampled fraction |S| / N.
        mean_dc = weighted_average([r.arrays[CONTROL_DELTA] for r in replies], [1.0] * len(replies))
        scale = len(replies) / ctx.num_training_clients  # N: the clients that train in this federation
        control = {k: (v.astype(np.float64) + scale * mean_dc[k]).astype(v.dtype) for k, v in c.items()}
        return {**state, MODEL: model, CONTROL: control}, {"c_norm": global_norm([control])}

    def _controls(self, model: nn.Module, ctx: ClientContext) -> tuple[dict[str, torch.Tensor], ...]:
        """(c, c_i) as tensors shaped like the model's parameters; c_i is zeros before the first fit."""
        if CONTROL not in ctx.received:
            raise FederationError("scaffold: the client received no control variate 'c' from the server")
        params = dict(model.named_parameters())
        c = {k: torch.as_tensor(v, dtype=params[k].dtype) for k, v in ctx.received[CONTROL].items()}
        own = ctx.load(OWN_CONTROL)
        c_i = own if own is not None else {k: torch.zeros_like(v) for k, v in c.items()}
        return c, c_i

    def make_step(self, model: nn.Module, ctx: ClientContext) -> Step:
        c, c_i = self._controls(model, ctx)
        correction = {k: c[k] - c_i[k] for k in c}  # shapes of the parameters
        # strategy.gradient on strategy.loss, then the correction
        gradient = self.local_gradient(ctx) or mean_gradient(ctx.loss())

        def step(m: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = gradient(m, batch, draw)
            for name, p in m.named_parameters():
                p.grad = correction[name].clone() if p.grad is None else p.grad.add_(correction[name])
            optimizer.step()
            return loss

        return step

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        x = {k: p.detach().clone() for k, p in model.named_parameters()}
        c, c_i = self._controls(model, ctx)
        # The paper's local solver is plain SGD: momentum would change what (x - y) / (K eta) measures.
        settings = dataclasses.replace(ctx.sgd(), momentum=0.0)
        stats = self.train(model, ctx, settings=settings)
        if stats.steps == 0:
            new_c_i = c_i
        else:
            scale = 1.0 / (stats.steps * settings.lr)
            new_c_i = {k: c_i[k] - c[k] + (x[k] - p.detach()) * scale for k, p in model.named_parameters()}
        ctx.save(OWN_CONTROL, new_c_i)
        c_delta = {k: (new_c_i[k] - c_i[k]).numpy() for k in new_c_i}
        return Update({MODEL: get_weights(model), CONTROL_DELTA: c_delta}, stats.metrics(), ctx.num_train)
