"""FedPer (Arivazhagan, Aggarwal, Singh and Choudhary, "Federated Learning with Personalization Layers",
arXiv:1912.00818, 2019).

The backbone is split into a shared body (every key but the head's,
:func:`fedmem.models.head_keys`) and a personal head. Each round a client assembles
the received global body with its own head (the received head on its first
participation), trains all parameters jointly for the local schedule, keeps the head
in its own file and uploads only the body. The server averages the bodies
(FedAvg over the uploaded keys); the head entries of the server state are never
updated, so the global model as a whole is not a predictor (no "global" row).

A client with no head of its own (held out of training, or never sampled) trains
only a head on the received body for the local schedule at evaluation (body frozen),
without saving it.

FedRep (:mod:`strategies.fedrep`) subclasses :class:`FedPer` for this body / head machinery.
"""

from __future__ import annotations

from torch import nn

from fedmem.models import Backbone, head_keys
from fedmem.strategy import MODEL, ClientContext, Strategy, Update, frozen, get_weights
from fedmem.training import SGDSettings, TrainStats, cross_entropy_step
from fedmem.updates import Weights

HEAD = "head"  # the per-client file holding a client's personal head


def split_parameters(model: Backbone) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's (body, head) parameters; the head is its ``head_module``."""
    prefix = model.head_module + "."
    body: list[nn.Parameter] = []
    head: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (head if name.startswith(prefix) else body).append(p)
    return body, head


def body_weights(model: Backbone) -> Weights:
    """The model's weights without its head: what FedPer and FedRep clients upload."""
    personal = set(head_keys(model))
    return {k: v for k, v in get_weights(model).items() if k not in personal}


class FedPer(Strategy):
    """Personalization layers: body averaged by the server, head kept on each client, trained jointly.

    FedRep subclasses it, overriding :meth:`train_personal` and :meth:`cold_start_settings`.
    """

    name = "fedper"
    title = "FedPer"
    summary = "FedPer: shared body averaged by the server, personal head kept on each client"
    label = "fedper"

    def train_personal(self, model: Backbone, ctx: ClientContext) -> dict[str, float]:
        """One round's training of the assembled (received body, own head) model; its metrics."""
        return self.train(model, ctx).metrics()

    def cold_start_settings(self, ctx: ClientContext) -> SGDSettings:
        """The schedule of the head trained at evaluation by a client with no head of its own."""
        return ctx.sgd()

    def load_head(self, model: Backbone, ctx: ClientContext) -> bool:
        """Put this client's saved head into ``model``; False (model untouched) if it has none."""
        saved = ctx.load(HEAD)
        if saved is None:
            return False
        model.load_state_dict({**model.state_dict(), **saved})
        return True

    def train_head(self, model: Backbone, ctx: ClientContext, settings: SGDSettings) -> TrainStats:
        """Train only the head; the body stays exactly as it was, BatchNorm running statistics included."""
        body, head = split_parameters(model)
        personal = set(head_keys(model))
        # train() puts the model in train mode, which would move the body's BatchNorm statistics.
        kept = {k: v.clone() for k, v in model.state_dict().items() if k not in personal}
        # the head phase's own step: under dpsgd its noise must not repeat the body phase's
        step = cross_entropy_step(self.extra_loss(model, ctx), self.local_gradient(ctx, HEAD), ctx.loss())
        with frozen(body):
            stats = self.train(model, ctx, settings=settings, parameters=head, step=step, purpose=HEAD)
        model.load_state_dict({**model.state_dict(), **kept})
        return stats

    def train_body(self, model: Backbone, ctx: ClientContext) -> TrainStats:
        """Train only the body for the local schedule; the head (no buffers) stays exactly as it was."""
        body, head = split_parameters(model)
        with frozen(head):
            return self.train(model, ctx, parameters=body)

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        self.load_head(model, ctx)  # first participation: the received head
        metrics = self.train_personal(model, ctx)
        state = model.state_dict()
        ctx.save(HEAD, {k: state[k].detach().clone() for k in head_keys(model)})
        return Update({MODEL: body_weights(model)}, metrics, ctx.num_train)

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        if not self.load_head(model, ctx):
            self.train_head(model, ctx, self.cold_start_settings(ctx))  # cold start, not saved
        return model
