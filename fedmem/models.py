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
    """A classifier split into a feature extractor and a linear head.

    ``head_module`` names the submodule that holds the head's parameters: FedRep and FedPer keep
    those keys on the client (:func:`head_keys`), and every other key is the shared body.
    """

    embedding_dim: int
    head_module: str = "classifier"

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


class CNNBatchNorm(CNN):
    """:class:`CNN` with BatchNorm after each convolution and before the embedding's ReLU (FedBN)."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, embedding_dim: int) -> None:
        super().__init__(in_shape, num_classes, embedding_dim)
        channels, height, width = in_shape
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 5, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 32 * (height // 4) * (width // 4)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.ReLU()
        )


class FedAvgCNN(Backbone):
    """PFLlib's "FedAvgCNN" (after McMahan et al. 2017's CNN), for comparisons with its leaderboard.

    Two unpadded 5x5 convolutions (32, 64 channels; ReLU, 2x2 max-pool), a ReLU layer of
    ``embedding_dim`` units (512 in PFLlib) and a linear head: 582k parameters on 28x28 inputs.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        channels, height, width = in_shape
        self.embedding_dim = embedding_dim
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 64 * ((((height - 4) // 2) - 4) // 2) * ((((width - 4) // 2) - 4) // 2)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, embedding_dim), nn.ReLU())
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(x))  # (B, C, 28, 28) -> (B, 64, 4, 4) -> (B, embedding_dim)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)


def head_keys(model: Backbone) -> list[str]:
    """State-dict keys of the model's head (its ``head_module``)."""
    prefix = model.head_module + "."
    return [k for k in model.state_dict() if k.startswith(prefix)]


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of every BatchNorm layer: affine parameters and running statistics."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            out += [f"{name}.{k}" for k in module.state_dict()]
    return out


ModelFactory = Callable[[tuple[int, int, int], int, int], Backbone]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")
MODELS.register("cnn", CNN)
MODELS.register("cnn_bn", CNNBatchNorm)
MODELS.register("fedavgcnn", FedAvgCNN)


def build_model(
    name: str,
    in_shape: tuple[int, int, int],
    num_classes: int,
    embedding_dim: int,
    seed: int,
    *keys: int | str,
) -> Backbone:
    """Build a registered model with weights initialised from ``(seed, *keys)`` (no global RNG touched).

    Without keys this is the run's one initial model; IFCA's K cluster models pass their own keys.
    """
    factory = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed(seed, "model-init", *keys))
        model = factory(in_shape, num_classes, embedding_dim)
    # channels_last: CPU max-pooling on NCHW dominated the CNN's time; measured on one thread,
    # training 339 -> 207 us/sample and inference 254 -> 75 us/sample (docs/benchmarks.md).
    return model.to(memory_format=torch.channels_last)
