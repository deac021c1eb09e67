"""FedRep (Collins, Hassani, Mokhtari and Shakkottai, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021).

Clients share a representation (the body, every key but the head's) and keep a
personal head. Each round a client assembles the received global body with its own
head (the received head on its first participation), then alternates:

1. head phase: ``head_epochs`` epochs of SGD on the head with the body frozen
   (BatchNorm running statistics of the body included);
2. body phase: the local schedule of ``[strategy]`` on the body with the head frozen.

It keeps the head in its own file and uploads only the body; the server averages the
bodies (FedAvg over the uploaded keys) and never updates the head entries of its state.

A client with no head of its own (held out of training, or never sampled) runs the
head phase alone on the received body at evaluation, without saving it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedmem.config import setting
from fedmem.models import Backbone
from fedmem.strategy import ClientContext
from fedmem.training import SGDSettings, steps_per_fit
from strategies.fedper import FedPer


class FedRep(FedPer):
    """Shared representation averaged by the server; per round, head epochs then body epochs."""

    name = "fedrep"
    title = "FedRep"
    summary = "FedRep: personal head trained first (body frozen), then the shared body (head frozen)"
    label = "fedrep"

    @dataclass(frozen=True)
    class Params:
        """``[strategy.fedrep]``."""

        # Epochs of the head phase: PFLlib's default (plocal_epochs = 1); the paper uses about
        # 10 local head epochs per round, so raise it to reproduce the paper's setting.
        head_epochs: int = setting(1, "[1, inf)")

    def cold_start_settings(self, ctx: ClientContext) -> SGDSettings:
        return replace(ctx.sgd(), epochs=self.params.head_epochs, steps=0)

    def dp_steps(self, examples: int) -> int:
        # the head phase runs DP-SGD too, and the uploaded body is trained on top of its head
        return super().dp_steps(examples) + steps_per_fit(
            examples, self.cfg.strategy.batch_size, self.params.head_epochs, 0
        )

    def train_personal(self, model: Backbone, ctx: ClientContext) -> dict[str, float]:
        head = self.train_head(model, ctx, self.cold_start_settings(ctx))
        body = self.train_body(model, ctx)
        return {"loss": body.loss, "head_loss": head.loss, "steps": float(head.steps + body.steps)}
