"""FedAvgM (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", arXiv:1909.06335, 2019).

Clients train as in FedAvg. The server treats ``delta = (example-weighted average of the
client models) - x`` as a pseudo-gradient and applies heavy-ball momentum to it:

    m <- server_momentum * m + delta,    x <- x + server_lr * m.

With ``server_momentum = 0`` and ``server_lr = 1`` this is FedAvg. The momentum buffer lives
in the server state under ``server/m`` and never leaves the server; integer buffers are taken
from the average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedmem.config import setting
from fedmem.server_optimizers import momentum_step, pseudo_gradient, zeros_like
from fedmem.strategy import MODEL, PRIVATE, Reply, ServerContext, Strategy, average_of
from fedmem.updates import Arrays, Weights, global_norm

MOMENTUM = PRIVATE + "m"  # the server's momentum buffer (floating keys of the model)


class FedAvgM(Strategy):
    """FedAvg with server momentum on the pseudo-gradient; every client uses the global model."""

    name = "fedavgm"
    title = "FedAvgM"
    summary = "FedAvgM: FedAvg with heavy-ball momentum on the server's pseudo-gradient"

    @dataclass(frozen=True)
    class Params:
        """``[strategy.fedavgm]``: server learning rate and momentum (Hsu et al. sweep 0.7-0.997)."""

        server_lr: float = setting(1.0, "(0, inf)")
        server_momentum: float = setting(0.9, "[0, 1)")

    def init(self, model: Weights, ctx: ServerContext) -> Arrays:
        return {MODEL: model, MOMENTUM: zeros_like(model)}

    def aggregate(
        self, state: Arrays, replies: Sequence[Reply], ctx: ServerContext
    ) -> tuple[Arrays, Mapping[str, float]]:
        if not replies:
            return state, {}
        x = state[MODEL]
        average = average_of(replies, average=self.average)
        new_x, m = momentum_step(
            x, average, state[MOMENTUM], server_lr=self.params.server_lr, momentum=self.params.server_momentum
        )
        metrics = {
            "pseudo_grad_norm": global_norm([pseudo_gradient(x, average)]),
            "momentum_norm": global_norm([m]),
        }
        return {**state, MODEL: new_x, MOMENTUM: m}, metrics
