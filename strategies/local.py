"""Local training: each client trains alone on its own data, the lower baseline of personalized FL.

Every round each sampled client continues training its own model (kept in the
run directory through ``ctx.save``, not in Flower's per-client state, which is
pickled on every message) from where it left off; the first round starts from
the common initialisation. Nothing is uploaded and nothing is averaged. Clients
held out of training have no model of their own and predict with the initial
weights.
"""

from __future__ import annotations

from fedmem.models import Backbone
from fedmem.strategy import ClientContext, Strategy, Update, Uploads


class Local(Strategy):
    """No communication: the server state stays the initial model, each client keeps its own model."""

    name = "local"
    title = "local only"
    summary = "Local: each client trains alone on its own data (no federation; lower baseline)"
    label = "local"
    averages_uploads = False  # nothing is uploaded or averaged

    def uploads(self) -> Uploads:
        return Uploads(())

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        own = ctx.load("local_model")
        if own is not None:
            model.load_state_dict(own)
        return model

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        model = self.client_model(model, ctx)
        stats = self.train(model, ctx)
        ctx.save("local_model", model.state_dict())
        return Update({}, stats.metrics(), ctx.num_train)
