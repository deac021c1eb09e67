"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedAvg whose clients minimise their loss plus a proximal term that keeps the local model
near the model they received,

    F_k(w) + mu / 2 * ||w - w_received||^2,

over all trainable parameters (buffers such as BatchNorm statistics are not penalised).
``mu = 0`` is FedAvg. The paper's tolerance to partial local work (variable numbers of local
steps per client) is not simulated: every client runs the configured local epochs or steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmem.strategy import ClientContext, Strategy
from fedmem.training import ExtraLoss


class FedProx(Strategy):
    """FedAvg plus a proximal term towards the received model; every client uses the global model."""

    name = "fedprox"
    title = "FedProx"
    summary = "FedProx: FedAvg with a proximal term mu/2 ||w - w_received||^2 in the local loss"

    @dataclass(frozen=True)
    class Params:
        """``[strategy.fedprox]``: ``mu``, the proximal weight (Li et al. try 0.001-1)."""

        mu: float = 0.01

    def extra_loss(self, model: nn.Module, ctx: ClientContext) -> ExtraLoss:
        # Called once per fit, before the first step: the parameters are still the received ones.
        anchor = [p.detach().clone() for p in model.parameters()]
        mu = self.params.mu

        def proximal(m: nn.Module) -> torch.Tensor:
            squares = [torch.sum(torch.square(p - a)) for p, a in zip(m.parameters(), anchor, strict=True)]
            return 0.5 * mu * torch.stack(squares).sum()

        return proximal
