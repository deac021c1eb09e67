"""FedBN (Li, Jiang, Zhang, Kamp and Dou, "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021).

FedAvg in which every BatchNorm layer stays local: each client keeps its own BN
affine parameters (weight, bias) and running statistics (mean, variance, batch
counter) in its own file. Each round a client assembles the received non-BN weights
with its own BN layers (the received ones on its first participation), trains all
parameters for the local schedule, keeps its BN layers and uploads everything else.
The server averages the uploaded keys; the BN entries of its state are never
updated. The model must have BatchNorm layers (``model.name = "cnn_bn"``).

A client with no BN layers of its own (held out of training, or never sampled)
trains only the BN affine parameters of the received model for the local schedule
at evaluation, which also re-estimates the running statistics on its train split,
without saving them.
"""

from __future__ import annotations

from torch import nn

from fedmem.errors import ConfigError
from fedmem.models import Backbone, batchnorm_keys
from fedmem.strategy import MODEL, ClientContext, ServerContext, Strategy, Update, frozen, get_weights

BN = "bn"  # the per-client file holding a client's BatchNorm layers


class FedBN(Strategy):
    """FedAvg with client-local BatchNorm layers (affine parameters and running statistics)."""

    name = "fedbn"
    title = "FedBN"
    summary = "FedBN: FedAvg with BatchNorm layers kept local on each client (needs model.name=cnn_bn)"
    label = "fedbn"

    def check(self, ctx: ServerContext) -> None:
        self.local_keys(ctx.new_model())

    def local_keys(self, model: Backbone) -> list[str]:
        """The keys of ``model``'s BatchNorm layers (a ConfigError if it has none)."""
        keys = batchnorm_keys(model)
        if not keys:
            raise ConfigError(
                "FedBN keeps each client's BatchNorm layers local but model "
                f"{self.cfg.model.name!r} has none; "
                'set model.name = "cnn_bn"'
            )
        return keys

    def load_bn(self, model: Backbone, ctx: ClientContext) -> bool:
        """Put this client's saved BN layers into ``model``; False (model untouched) if it has none."""
        saved = ctx.load(BN)
        if saved is None:
            return False
        model.load_state_dict({**model.state_dict(), **saved})
        return True

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        local = set(self.local_keys(model))
        self.load_bn(model, ctx)  # first participation: the received BN layers
        stats = self.train(model, ctx)
        state = model.state_dict()
        ctx.save(BN, {k: state[k].detach().clone() for k in local})
        shared = {k: v for k, v in get_weights(model).items() if k not in local}
        return Update({MODEL: shared}, stats.metrics(), ctx.num_train)

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        if self.load_bn(model, ctx):
            return model
        # Cold start, not saved: BN affine parameters only; train mode re-estimates the statistics.
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        affine = {id(p) for m in norms for p in m.parameters()}
        other = [p for p in model.parameters() if id(p) not in affine]
        with frozen(other):
            self.train(model, ctx, parameters=[p for m in norms for p in m.parameters()], purpose=BN)
        return model
