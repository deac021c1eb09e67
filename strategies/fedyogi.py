"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

FedAdam (:mod:`strategies.fedadam`) with Yogi's additive second moment (Zaheer et al.,
"Adaptive Methods for Nonconvex Optimization", NeurIPS 2018):

    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2),

so ``v`` moves towards ``delta^2`` by at most ``(1 - beta2) * delta^2`` per round. Everything
else (moments under ``server/m`` and ``server/v``, no bias correction, ``v`` starting at
``tau^2``) is FedAdam's.
"""

from __future__ import annotations

from typing import ClassVar

from fedmem.server_optimizers import SecondMoment, yogi_second_moment
from strategies.fedadam import FedAdam


class FedYogi(FedAdam):
    """FedAvg clients with a Yogi server optimizer; every client uses the global model."""

    name = "fedyogi"
    title = "FedYogi"
    summary = "FedYogi: FedAvg clients, Yogi on the server's pseudo-gradient (Reddi et al. 2021)"
    second_moment: ClassVar[SecondMoment] = staticmethod(yogi_second_moment)
