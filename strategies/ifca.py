"""IFCA (Ghosh, Chung, Yin and Ramchandran, "An Efficient Framework for Clustered Federated Learning",
NeurIPS 2020), the model-averaging variant (option II of the paper's Algorithm 2).

The server keeps K cluster models ``cluster/0`` ... ``cluster/K-1``, initialised
independently, and broadcasts all of them. Each sampled client estimates its cluster
as the one whose model has the lowest mean loss on its train split,

    j = argmin_k  (1 / n) sum_i  CE(theta_k; x_i, y_i)        (ties: the lowest k),

trains that model for the local schedule and uploads it under ``cluster/j``. The
server averages each cluster model over the clients that chose it, weighted by their
example counts; a cluster nobody chose keeps its weights.

A client predicts with the cluster model of lowest train loss, chosen afresh from
the current models at evaluation; clients held out of training choose the same way on
their own train split. Nothing is saved on the clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fedmem.config import setting
from fedmem.errors import FederationError
from fedmem.models import Backbone
from fedmem.strategy import (
    ClientContext,
    Reply,
    ServerContext,
    Strategy,
    Update,
    Uploads,
    get_weights,
    set_weights,
)
from fedmem.training import logits_and_embeddings
from fedmem.updates import Arrays, Weights


def cluster_name(k: int) -> str:
    """The state's name of cluster model ``k``."""
    return f"cluster/{k}"


def mean_loss(model: Backbone, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Mean cross-entropy of ``model`` on (x, y) in inference mode, batched (NaN for no rows)."""
    if len(y) == 0:
        return float("nan")
    logits, _ = logits_and_embeddings(model, x, batch_size)  # (n, num_classes)
    return float(F.cross_entropy(torch.from_numpy(logits).double(), y))


def pick_cluster(losses: Sequence[float]) -> int:
    """The index of the lowest loss, the lowest index among ties (and 0 if all are NaN)."""
    values = np.asarray(losses, np.float64)
    return 0 if np.isnan(values).all() else int(np.nanargmin(values))


class Ifca(Strategy):
    """K cluster models; each client trains, uploads and predicts with the one that fits it best."""

    name = "ifca"
    title = "IFCA"
    summary = "IFCA: K cluster models; each client picks the one of lowest train loss, trains and uses it"
    label = "ifca"
    not_sample_private = (
        "IFCA clients choose their cluster by each cluster model's loss on their own train data, "
        "and the choice travels with the upload unnoised"
    )

    @dataclass(frozen=True)
    class Params:
        """``[strategy.ifca]``."""

        # K, the number of cluster models (the paper's experiments use 2 to 4)
        clusters: int = setting(2, "[1, inf)", message="{key} must be at least 1, got {value}")

    def uploads(self) -> Uploads:
        note = (
            "IFCA clients each upload one of K cluster models, so the server's per-cluster averages have "
            "data-dependent denominators and which cluster a client chose is released unnoised"
        )
        names = tuple(cluster_name(k) for k in range(self.params.clusters))
        return Uploads(names, every_client=False, note=note)

    def init(self, model: Weights, ctx: ServerContext) -> Arrays:
        # Independent initialisations (keys "ifca", k), not K copies of the run's initial model.
        return {cluster_name(k): ctx.initial_weights("ifca", k) for k in range(self.params.clusters)}

    def aggregate(
        self, state: Arrays, replies: Sequence[Reply], ctx: ServerContext
    ) -> tuple[Arrays, Mapping[str, float]]:
        new_state, _ = super().aggregate(state, replies, ctx)
        counts = {
            f"clients/cluster_{k}": float(sum(cluster_name(k) in r.arrays for r in replies))
            for k in range(self.params.clusters)
        }
        return new_state, counts

    def choose(self, model: Backbone, ctx: ClientContext) -> tuple[int, list[float]]:
        """Load the received cluster of lowest mean train loss into ``model``; its index and all losses."""
        names = [cluster_name(k) for k in range(self.params.clusters)]
        missing = [n for n in names if n not in ctx.received]
        if missing:
            raise FederationError(f"IFCA client {ctx.pid} did not receive {missing[0]}")
        d, batch = ctx.data, self.cfg.eval.batch_size
        losses = []
        for n in names:
            set_weights(model, ctx.received[n])
            losses.append(mean_loss(model, d.x_train, d.y_train, batch))
        j = pick_cluster(losses)
        set_weights(model, ctx.received[names[j]])
        return j, losses

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        j, losses = self.choose(model, ctx)
        stats = self.train(model, ctx)
        metrics = {**stats.metrics(), "cluster": float(j), "cluster_loss": losses[j]}
        return Update({cluster_name(j): get_weights(model)}, metrics, ctx.num_train)

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        self.choose(model, ctx)
        return model
