"""kNN-Per (Marfoq et al., "Personalized Federated Learning through Local Memorization", ICML 2022).

The backbone is trained with FedAvg. Each client then builds a local memory, a
FAISS index of the backbone's embeddings of its own train split with their
labels, and predicts

    p(y | x) = lambda * p_kNN(y | x) + (1 - lambda) * softmax(head(features(x)))_y,
    p_kNN(y | x) ∝ sum over the k nearest stored (z_i, y_i) of 1{y_i = y} exp(-||z_i - features(x)||^2 / T),

with T = ``memory.temperature``, or the embedding size when that is 0 (the paper's convention).

On text the memory holds one (hidden state at position t, character at t + 1) pair per
position of the train windows, and every position is a query: the kNN-LM form
(Khandelwal et al., ICLR 2020) of the paper's Shakespeare experiment.

lambda and k are chosen per client on its validation split from
``memory.lambda_grid`` x ``memory.k_grid``. A client held out of training
builds its memory the same way, with no gradient step. As a personalizer
(``eval.personalizers``) the memory composes with any strategy's backbone.
``memory.mix_logits`` reproduces the reference implementations, which mix
p_kNN with raw logits instead of probabilities. ``memory.exclude_self`` and
``memory.embedding_noise`` limit what the memory reveals about its members
(see :mod:`fedmem.memory.datastore`); the audit scores the same store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fedmem.config import MemoryConfig
from fedmem.memory.datastore import Datastore
from fedmem.memory.knn import accuracy_grid, interpolate, knn_probabilities, select_lambda_k
from fedmem.models import Backbone
from fedmem.seeding import rng as derive_rng
from fedmem.strategy import ClientContext, Predictor, Strategy
from fedmem.training import from_rows, logits_and_embeddings, softmax, to_rows


def _model_part(logits: np.ndarray, memory: MemoryConfig) -> np.ndarray:
    # (n, C): probabilities by default; raw logits only under the named compatibility option.
    return logits.astype(np.float64) if memory.mix_logits else softmax(logits)


T = TypeVar("T")


def _over_grid(
    score: Callable[..., T],
    model: Backbone,
    store: Datastore,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    memory: MemoryConfig,
    temperature: float,
    batch_size: int,
) -> T:
    """Embed ``x``, search ``max(k_grid)`` neighbours and score the (k, lambda) grid on labels ``y``.

    ``score`` is :func:`select_lambda_k` (validation) or :func:`accuracy_grid` (the oracle).
    Text windows count every position (next-character accuracy).
    """
    logits, z = (to_rows(a) for a in logits_and_embeddings(model, x, batch_size))
    distances, labels = store.search(z, max(memory.k_grid))  # (n, K) each
    return score(
        distances,
        labels,
        _model_part(logits, memory),
        y.numpy().reshape(-1),
        num_classes=num_classes,
        temperature=temperature,
        k_grid=memory.k_grid,
        lambda_grid=memory.lambda_grid,
    )


@dataclass
class KnnPredictor:
    """lambda * p_kNN + (1 - lambda) * p_model over a client's datastore."""

    model: Backbone
    store: Datastore
    lam: float
    k: int
    num_classes: int
    memory: MemoryConfig
    temperature: float
    batch_size: int
    info: Mapping[str, float]

    def predict(self, x: torch.Tensor) -> np.ndarray:
        logits, z = logits_and_embeddings(self.model, x, self.batch_size)
        return from_rows(self.from_outputs(to_rows(logits), to_rows(z)), logits.shape)

    def from_outputs(self, logits: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (n, C) from the backbone's logits (n, C) and embeddings (n, D) of n positions."""
        distances, labels = self.store.search(embeddings, self.k)  # (n, k) each
        p_knn = knn_probabilities(distances, labels, self.num_classes, self.temperature)
        return interpolate(p_knn, _model_part(logits, self.memory), self.lam)

    def oracle_accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Best accuracy over the (k, lambda) grid tuned on (x, y) itself: an oracle, for reports only."""
        grid = _over_grid(
            accuracy_grid,
            self.model,
            self.store,
            x,
            y,
            self.num_classes,
            self.memory,
            self.temperature,
            self.batch_size,
        )
        return float(grid.max())


class KnnPer(Strategy):
    """FedAvg training; personalize = a per-client kNN memory interpolated with the model."""

    name = "knnper"
    title = "kNN-Per"
    on_any_model = True
    summary = "kNN-Per: FedAvg backbone + per-client FAISS memory, lambda and k tuned on validation"
    label = "knn"

    def personalize(self, model: Backbone, ctx: ClientContext) -> Predictor:
        m, d, t = self.cfg.memory, ctx.data, self.cfg.kernel_temperature
        batch = self.cfg.eval.batch_size
        _, z_train = logits_and_embeddings(model, d.x_train, batch)
        store = Datastore(  # text: one (hidden state at t, character at t + 1) pair per position
            to_rows(z_train),
            d.y_train.numpy().reshape(-1),
            index=m.index,
            capacity=m.capacity,
            rng=ctx.rng("memory"),
            nprobe=m.nprobe,
            hnsw_m=m.hnsw_m,
            ef_search=m.ef_search,
            exclude_self=m.exclude_self,
            embedding_noise=m.embedding_noise,
            # not keyed by round: an entry keeps one noise draw, which later rounds cannot average out
            noise_rng=derive_rng(self.cfg.seed, "memory-noise", ctx.pid),
        )
        selection = _over_grid(select_lambda_k, model, store, d.x_val, d.y_val, d.num_classes, m, t, batch)
        info = {"lambda": selection.lam, "k": float(selection.k), "val_accuracy": selection.accuracy}
        return KnnPredictor(model, store, selection.lam, selection.k, d.num_classes, m, t, batch, info)
