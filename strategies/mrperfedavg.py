"""Meta-regularized Per-FedAvg, after Yin, Tucker, Zhou, Levine and Finn, "Meta-Learning without
Memorization", ICLR 2020.

When one model can solve every training client zero-shot (the client is recognisable from its
inputs), MAML-style meta-learning memorizes the clients and stops adapting; Yin et al. restore
adaptation by limiting the information the meta-parameters (W) or the query activations (A)
carry. Both are Per-FedAvg's step (:mod:`strategies.perfedavg`, first-order or Hessian-free) on a
regularized objective; ``beta_kl`` is the paper's beta.

``regularizer = "weights"`` (MR-W): the parameters of the modules in ``layers`` are a mean-field
Gaussian q = N(mu, diag(sigma^2)) with sigma = exp(log_sigma). Per step one sample
w = mu + sigma * eps, eps ~ N(0, I) from the client's seeded torch generator, and

    min_{mu, log_sigma}  F_i(w) + beta_kl * KL(q || N(0, prior_sigma^2 I)),
    KL = sum [log(prior_sigma / sigma) + (sigma^2 + mu^2) / (2 prior_sigma^2) - 1/2],

F_i being Per-FedAvg's objective f_i(w - alpha grad f_i(w)). Its meta-gradient G at the sample
reaches mu as G and log_sigma as G * sigma * eps (reparameterization). mu is the model's own
weights; log_sigma travels as the named arrays ``log_sigma`` (averaged like the model). The
model deploys and adapts from the means.

``regularizer = "activations"`` (MR-A): an information bottleneck on the query (D')
activations. The embedding h = features(x) is the mean of z ~ N(h, diag(s(h)^2)) with
s(h) = softplus(A h + b) (A, b: the named arrays ``bottleneck``, A = 0 at the start), and

    min  f_i(head(z(w~; x')), y') + beta_kl * E_x' KL(N(h, s^2) || N(0, I)),
    KL = 1/2 sum_d (s_d^2 + h_d^2 - 1 - 2 log s_d),

with w~ = w - alpha grad f_i(w; D) adapted on the deterministic support loss; the KL is averaged
over the query examples (and positions). Prediction and adaptation use z = h.

``sample = false`` uses the means (eps = 0); with ``beta_kl = 0`` as well, both give exactly
Per-FedAvg's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmem.config import setting
from fedmem.errors import ConfigError
from fedmem.models import Backbone
from fedmem.strategy import MODEL, ClientContext, ServerContext, Update, Uploads, get_weights
from fedmem.training import Batch, Draw, LossFn, Step
from fedmem.updates import Arrays, Weights
from strategies.perfedavg import (
    ONE_OF,
    Loss,
    PerFedAvg,
    apply_gradients,
    batch_loss,
    draw_batches,
    gradients,
    meta_gradient,
    restore,
)

REGULARIZERS = ("weights", "activations")
LOG_SIGMA = "log_sigma"  # MR-W: log-scales of the stochastic weights, by parameter name
BOTTLENECK = "bottleneck"  # MR-A: the layer giving the activations' scales


def kl_weights(
    mu: Sequence[torch.Tensor], log_sigma: Sequence[torch.Tensor], prior_sigma: float
) -> torch.Tensor:
    """KL(N(mu, diag(exp(log_sigma)^2)) || N(0, prior_sigma^2 I)), summed over every weight."""
    terms = [
        torch.sum(math.log(prior_sigma) - s + (torch.exp(2 * s) + m * m) / (2 * prior_sigma**2) - 0.5)
        for m, s in zip(mu, log_sigma, strict=True)
    ]
    return torch.stack(terms).sum()


def kl_activations(mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, diag(scale^2)) || N(0, I)) over axis 1, averaged over examples and positions."""
    return 0.5 * torch.sum(scale**2 + mean**2 - 1 - 2 * torch.log(scale), dim=1).mean()


class WeightsStep:
    """MR-W's step: Per-FedAvg's meta-gradient at a sample of the stochastic weights, plus the KL."""

    def __init__(
        self,
        params: MRPerFedAvg.Params,
        keys: Sequence[str],
        log_sigma: Sequence[nn.Parameter],
        generator: torch.Generator,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        self.p, self.keys, self.log_sigma, self.generator = params, list(keys), list(log_sigma), generator
        self.loss_fn = loss_fn  # the run's strategy.loss

    def __call__(
        self, model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        p, named = self.p, dict(model.named_parameters())
        params, chosen = list(model.parameters()), [named[k] for k in self.keys]
        mu = [w.detach().clone() for w in chosen]
        eps = [torch.zeros_like(w) for w in mu]
        if p.sample:
            eps = [torch.randn(w.shape, generator=self.generator) for w in mu]
            with torch.no_grad():
                for w, m, s, e in zip(chosen, mu, self.log_sigma, eps, strict=True):
                    w.copy_(m + torch.exp(s) * e)
        loss = batch_loss(model, self.loss_fn)
        grads, query_loss = meta_gradient(
            params, loss, loss, draw_batches(batch, draw, p.variant == "hf"), p.alpha, p.delta
        )
        restore(chosen, mu)
        kl = kl_weights(chosen, self.log_sigma, p.prior_sigma)
        kl_grads = gradients(p.beta_kl * kl, [*chosen, *self.log_sigma])
        index = {id(w): i for i, w in enumerate(params)}
        scale_grads = []
        for j, (w, s, e) in enumerate(zip(chosen, self.log_sigma, eps, strict=True)):
            i = index[id(w)]
            # reparameterization: d w / d mu = 1, d w / d log_sigma = sigma * eps
            scale_grads.append(grads[i] * torch.exp(s.detach()) * e + kl_grads[len(chosen) + j])
            grads[i] = grads[i] + kl_grads[j]
        apply_gradients([*params, *self.log_sigma], [*grads, *scale_grads], optimizer)
        return query_loss + p.beta_kl * kl.detach()


class ActivationsStep:
    """MR-A's step: Per-FedAvg's meta-gradient with a stochastic, KL-penalised query embedding."""

    def __init__(
        self,
        params: MRPerFedAvg.Params,
        bottleneck: nn.Linear,
        generator: torch.Generator,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        self.p, self.bottleneck, self.generator = params, bottleneck, generator
        self.loss_fn = loss_fn  # the run's strategy.loss

    def query_loss(self, model: Backbone) -> Loss:
        """The outer loss on D': the run's loss on a sampled embedding + beta_kl * the bottleneck's KL."""

        def loss(batch: Batch) -> torch.Tensor:
            x, y = batch
            h = model.features(x)  # (B, D, *positions)
            scale = F.softplus(self.bottleneck(h.movedim(1, -1))).movedim(-1, 1)
            z = h
            if self.p.sample:
                z = h + scale * torch.randn(h.shape, generator=self.generator)
            return self.loss_fn(model.head(z), y) + self.p.beta_kl * kl_activations(h, scale)

        return loss

    def __call__(
        self, model: nn.Module, batch: Batch, draw: Draw, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor:
        assert isinstance(model, Backbone)
        p = self.p
        params = [*model.parameters(), *self.bottleneck.parameters()]
        batches = draw_batches(batch, draw, p.variant == "hf")
        grads, query_loss = meta_gradient(
            params, batch_loss(model, self.loss_fn), self.query_loss(model), batches, p.alpha, p.delta
        )
        apply_gradients(params, grads, optimizer)
        return query_loss


class MRPerFedAvg(PerFedAvg):
    """Per-FedAvg with Yin et al.'s meta-regularizer on the weights (MR-W) or query activations (MR-A)."""

    name = "mrperfedavg"
    title = "MR Per-FedAvg"
    summary = "Meta-regularized Per-FedAvg: KL-weighted stochastic weights or query activations (Yin et al.)"
    label = "mrperfedavg"

    @dataclass(frozen=True)
    class Params(PerFedAvg.Params):
        """``[strategy.mrperfedavg]``: Per-FedAvg's parameters plus the regularizer's."""

        # "weights" (MR-W) or "activations" (MR-A)
        regularizer: str = setting("weights", choices=REGULARIZERS, message=ONE_OF)
        beta_kl: float = 1e-4  # weight of the KL term (Yin et al.'s beta)
        sample: bool = True  # false: use the means (no noise)
        prior_sigma: float = setting(1.0, "(0, inf)")  # MR-W prior scale
        # initial scale of the stochastic weights or activations
        init_sigma: float = setting(1e-3, "(0, inf)")
        layers: tuple[str, ...] = ("classifier",)  # MR-W: modules whose weights are stochastic

    def check(self, ctx: ServerContext) -> None:
        if self.params.regularizer == "weights":  # layers must name modules of the model
            self.stochastic_keys([n for n, _ in ctx.new_model().named_parameters()])

    def stochastic_keys(self, names: Sequence[str]) -> list[str]:
        """MR-W: the parameter ``names`` under ``layers`` (a ConfigError if a layer holds none)."""
        for layer in self.params.layers:
            if not any(n.startswith(layer + ".") for n in names):
                modules = sorted({n.rsplit(".", 1)[0] for n in names})
                raise ConfigError(
                    f"strategy.mrperfedavg.layers names {layer!r}, which holds no parameters of the model; "
                    f"valid modules: {', '.join(modules)}"
                )
        return [n for n in names if any(n.startswith(layer + ".") for layer in self.params.layers)]

    def initial(self, shapes: Mapping[str, tuple[int, ...]], embedding_dim: int) -> tuple[str, Weights]:
        """The regularizer's named arrays at the start, from the model's parameter shapes.

        MR-W: log_sigma = log(init_sigma) for each stochastic parameter; MR-A: the bottleneck
        with A = 0 and softplus(b) = init_sigma.
        """
        p = self.params
        if p.regularizer == "weights":
            value = math.log(p.init_sigma)
            return LOG_SIGMA, {
                k: np.full(shapes[k], value, np.float32) for k in self.stochastic_keys(list(shapes))
            }
        d = embedding_dim
        bias = p.init_sigma + math.log(-math.expm1(-p.init_sigma))  # softplus^-1, without overflow
        return BOTTLENECK, {"weight": np.zeros((d, d), np.float32), "bias": np.full(d, bias, np.float32)}

    def uploads(self) -> Uploads:
        return Uploads((MODEL, LOG_SIGMA if self.params.regularizer == "weights" else BOTTLENECK))

    def init(self, model: Weights, ctx: ServerContext) -> Arrays:
        names = [n for n, _ in ctx.new_model().named_parameters()]  # not the buffers
        name, arrays = self.initial({k: model[k].shape for k in names}, self.cfg.model.embedding_dim)
        return {MODEL: model, name: arrays}

    def make_step(self, model: nn.Module, ctx: ClientContext) -> Step:
        assert isinstance(model, Backbone)
        name, start = self.initial(
            {k: tuple(v.shape) for k, v in model.named_parameters()}, model.embedding_dim
        )
        # a client asked without the regularizer's arrays (a personalizer's fit) starts from the initial ones
        received = {
            k: nn.Parameter(torch.from_numpy(np.array(v))) for k, v in ctx.received.get(name, start).items()
        }
        generator = ctx.torch_rng(self.name)
        if name == LOG_SIGMA:
            keys = list(start)
            return WeightsStep(self.params, keys, [received[k] for k in keys], generator, ctx.loss())
        bottleneck = nn.Linear(model.embedding_dim, model.embedding_dim)
        with torch.no_grad():
            for k, v in received.items():
                getattr(bottleneck, k).copy_(v)
        return ActivationsStep(self.params, bottleneck, generator, ctx.loss())

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        step = self.make_step(model, ctx)
        if isinstance(step, WeightsStep):
            extra, name = step.log_sigma, LOG_SIGMA
            uploaded: dict[str, nn.Parameter] = dict(zip(step.keys, extra, strict=True))
        else:
            assert isinstance(step, ActivationsStep)
            name = BOTTLENECK
            uploaded = dict(step.bottleneck.named_parameters())
        stats = self.train(
            model,
            ctx,
            settings=self.meta_settings(ctx),
            step=step,
            parameters=[*model.parameters(), *uploaded.values()],
        )
        arrays = {k: v.detach().numpy().copy() for k, v in uploaded.items()}
        return Update({MODEL: get_weights(model), name: arrays}, stats.metrics(), ctx.num_train)
