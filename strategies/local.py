"""Local training: each client trains alone on its own data, the lower baseline of personalized FL.

Every round each sampled client continues training its own model (kept on
disk in the run directory, not in Flower's per-client state, which is pickled
on every message) from where it left off; the first round starts from the
common initialisation. Nothing is averaged. Clients held out of training have
no model of their own and predict with the initial weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fedmem.models import Backbone
from fedmem.results import atomic_torch_save
from fedmem.strategy import ClientContext, Reply, Strategy, Weights


class Local(Strategy):
    """No communication: the aggregate keeps the initial weights, each client keeps its own model."""

    name = "local"
    summary = "Local: each client trains alone on its own data (no federation; lower baseline)"
    label = "local"

    @staticmethod
    def _path(ctx: ClientContext) -> Path:
        return ctx.state_dir / "local_model.pt"

    def client_model(self, model: Backbone, ctx: ClientContext) -> Backbone:
        path = self._path(ctx)
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
        return model

    def fit(self, model: Backbone, ctx: ClientContext) -> Mapping[str, float]:
        metrics = super().fit(self.client_model(model, ctx), ctx)
        atomic_torch_save(model.state_dict(), self._path(ctx))
        return metrics

    def aggregate(self, current: Weights, replies: Sequence[Reply]) -> Weights:
        return current
