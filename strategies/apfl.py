"""APFL (Deng, Kamani and Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461, 2020).

Each client keeps a personal model v and a mixing weight alpha and predicts with
the mixture v_bar = alpha * v + (1 - alpha) * w of v and the global model w.
Per mini-batch, from the current (v, w, alpha):

    w     <- w - eta * grad_w f(w)                       (uploaded; exactly FedAvg's step)
    v     <- v - eta * grad_v f(v_bar) = v - eta * alpha * grad f(v_bar)
    alpha <- clamp(alpha - alpha_lr * <grad f(v_bar), v - w>, 0, 1)

with f the batch cross-entropy and all three gradients taken at the same (v, w, alpha),
as in the paper's Algorithm 1 (adaptive alpha). v uses an optimizer of the local
settings (momentum, weight decay) of its own. The mixed forward is one
``torch.func.functional_call`` on w's module with the mixed parameters.

BatchNorm (not in the paper): v's running statistics are the ones updated by the
mixed forward, and the predictor mixes floating buffers like parameters (integer
counters from w). A client that never trained runs this local procedure from
v = w = the received global model and alpha = ``alpha`` at evaluation, without saving,
and predicts with the mixture of its v and its locally trained w.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from fedmem.config import setting
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
from fedmem.training import Batch, Draw, LossFn, SGDSettings, Step

ALPHA = "apfl_alpha"  # the per-client file of alpha


def mixed_gradients(
    model: nn.Module,
    personal: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    alpha: torch.Tensor,
    batch: Batch,
    loss_fn: LossFn = F.cross_entropy,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Loss of v_bar = alpha * v + (1 - alpha) * w on ``batch`` and its gradients w.r.t. v and alpha.

    ``model`` holds w (not differentiated); ``personal`` maps its parameter names to v's
    parameters; ``buffers`` are passed to the forward (v's, updated in place in train mode).
    Returns (loss, gradients w.r.t. ``personal``'s values in order, gradient w.r.t. alpha).
    """
    x, y = batch
    mixed = {k: alpha * personal[k] + (1 - alpha) * w.detach() for k, w in model.named_parameters()}
    loss = loss_fn(functional_call(model, {**mixed, **buffers}, (x,)), y)
    *grads, grad_alpha = torch.autograd.grad(loss, [*personal.values(), alpha])
    return loss.detach(), grads, grad_alpha


def mixture(personal: Backbone, model: Backbone, alpha: float) -> Backbone:
    """A copy of ``model`` (w) holding alpha * v + (1 - alpha) * w in every floating tensor."""
    v = personal.state_dict()
    state = {
        k: alpha * v[k] + (1 - alpha) * w if w.is_floating_point() else w
        for k, w in model.state_dict().items()
    }
    out = clone(model)
    out.load_state_dict(state)
    return out


class ApflStep:
    """The APFL step on w (the trained module); holds v, its optimizer and alpha across batches."""

    def __init__(
        self,
        personal: Backbone,
        alpha: float,
        alpha_lr: float,
        settings: SGDSettings,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        self.personal = personal
        self.loss_fn = loss_fn  # the run's strategy.loss, for w, v and alpha alike
        self.alpha = torch.tensor(alpha, requires_grad=True)
        self.alpha_lr = alpha_lr
        self.params = dict(personal.named_parameters())
        self.buffers = dict(personal.named_buffers())
        s = settings
        self.optimizer = torch.optim.SGD(
            self.params.values(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
        )

    def __call__(
        self, model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        _, grads, grad_alpha = mixed_gradients(
            model, self.params, self.buffers, self.alpha, batch, self.loss_fn
        )
        x, y = batch
        loss = self.loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for p, g in zip(self.params.values(), grads, strict=True):
            p.grad = g
        self.optimizer.step()
        with torch.no_grad():
            self.alpha.sub_(self.alpha_lr * grad_alpha).clamp_(0.0, 1.0)
        return loss.detach()

    @property
    def alpha_value(self) -> float:
        """The current mixing weight as a number."""
        return float(self.alpha.detach())


class Apfl(Strategy):
    """FedAvg for w; each client learns a personal v and alpha and predicts with their mixture."""

    name = "apfl"
    title = "APFL"
    summary = "APFL: FedAvg global w + personal v, mixed with a learned per-client alpha to predict"
    label = "apfl"
    reports_global = True
    robust_gradients = False  # its step differentiates the mixed model: no per-batch CE gradient to replace

    @dataclass(frozen=True)
    class Params:
        """``[strategy.apfl]``."""

        # initial mixing weight of the personal model
        alpha: float = setting(0.5, "[0, 1]")
        alpha_lr: float = 0.01  # step size of alpha's SGD update (the default local lr, as in PFLlib)

    def _step(self, model: Backbone, ctx: ClientContext) -> ApflStep:
        saved, alpha = load_personal(model, ctx), ctx.load(ALPHA)
        personal = saved if saved is not None else clone(model)
        start = float(alpha) if alpha is not None else self.params.alpha
        return ApflStep(personal, start, self.params.alpha_lr, ctx.sgd(), ctx.loss())

    def make_step(self, model: nn.Module, ctx: ClientContext) -> Step:
        assert isinstance(model, Backbone)
        return self._step(model, ctx)

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        step = self._step(model, ctx)
        stats = self.train(model, ctx, step=step)
        ctx.save(PERSONAL, step.personal.state_dict())
        ctx.save(ALPHA, torch.tensor(step.alpha_value))
        metrics = {**stats.metrics(), "alpha": step.alpha_value}
        return Update({MODEL: get_weights(model)}, metrics, ctx.num_train)

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        saved, alpha = load_personal(model, ctx), ctx.load(ALPHA)
        if saved is not None and alpha is not None:
            return mixture(saved, model, float(alpha))
        step = self._step(model, ctx)  # cold start: the local procedure, not saved
        self.train(model, ctx, step=step)
        return mixture(step.personal, model, step.alpha_value)
