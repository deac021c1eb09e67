"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017).

Clients run local SGD from the global model; the server averages the replies
weighted by each client's number of training examples. These are the hooks of
:class:`fedmem.strategy.Strategy` unchanged.
"""

from fedmem.strategy import Strategy


class FedAvg(Strategy):
    """Federated averaging; every client predicts with the global model."""

    name = "fedavg"
    title = "FedAvg"
    summary = "FedAvg: local SGD, example-weighted averaging; all clients use the global model"
