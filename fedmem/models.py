"""Backbones: ``features(x) -> embedding`` and ``head(z) -> logits``.

Every model exposes the split so that personalizers (kNN-Per's memory, FedRep's
head) can work on any backbone without knowing its layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fedmem.registry import Registry
from fedmem.seeding import torch_seed


class Backbone(nn.Module):
    """A classifier split into a feature extractor and a linear head."""

    embedding_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs (B, C, H, W) to embeddings (B, embedding_dim)."""
        raise NotImplementedError

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Map embeddings (B, embedding_dim) to logits (B, num_classes)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN(Backbone):
    """Two 5x5 conv layers (16, 32 channels; ReLU, 2x2 max-pool), a ReLU embedding layer, a linear head.

    With 28x28 inputs and a 64-unit embedding this is the 114k-parameter CNN
    of the reference measurements (DESIGN.md, issue 2).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        channels, height, width = in_shape
        self.embedding_dim = embedding_dim
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 32 * (height // 4) * (width // 4)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, embedding_dim), nn.ReLU())
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(x))  # (B, C, H, W) -> (B, 32, H/4, W/4) -> (B, embedding_dim)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)


ModelFactory = Callable[[tuple[int, int, int], int, int], Backbone]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")
MODELS.register("cnn", CNN)


def build_model(
    name: str, in_shape: tuple[int, int, int], num_classes: int, embedding_dim: int, seed: int
) -> Backbone:
    """Build a registered model with weights initialised from ``seed`` (no global RNG touched)."""
    factory = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, "model-init"))
        model = factory(in_shape, num_classes, embedding_dim)
    # channels_last: CPU max-pooling on NCHW dominated the CNN's time; measured on one thread,
    # training 339 -> 207 us/sample and inference 254 -> 75 us/sample (docs/benchmarks.md).
    return model.to(memory_format=torch.channels_last)
