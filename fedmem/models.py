"""Backbones: ``features(x) -> embedding`` and ``head(z) -> logits``.

Every model exposes the split so that personalizers (kNN-Per's memory, FedRep's
head) can work on any backbone without knowing its layers.

Shapes follow torch's convention for losses over positions: the class (or
feature) axis is axis 1 and any further axes are positions. An image model
maps (B, C, H, W) to embeddings (B, D) and logits (B, K); a next-character
model maps token ids (B, L) to embeddings (B, D, L) and logits (B, K, L), with
targets (B, L), so ``F.cross_entropy``, softmax over axis 1 and argmax over
axis 1 serve both without a special case. :func:`fedmem.training.to_rows`
turns either into one row per prediction.
"""

from __future__ import annotations

import torch
from torch import nn

from fedmem.errors import ConfigError
from fedmem.registry import Registry
from fedmem.seeding import torch_seed
from fedmem.updates import Weights


class Backbone(nn.Module):
    """A classifier split into a feature extractor and a linear head.

    ``head_module`` names the submodule that holds the head's parameters: FedRep and FedPer keep
    those keys on the client (:func:`head_keys`), and every other key is the shared body.
    """

    embedding_dim: int
    head_module: str = "classifier"
    inputs: str = "image"  # what the model reads: "image" (C, H, W) or "text" (token ids, one axis)

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Map inputs (B, ...) to embeddings (B, embedding_dim, *positions): (B, D) for images."""
        raise NotImplementedError

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Map embeddings (B, embedding_dim, *positions) to logits (B, num_classes, *positions)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CNN(Backbone):
    """Two 5x5 conv layers (16, 32 channels; ReLU, 2x2 max-pool), a ReLU embedding layer, a linear head.

    With 28x28 inputs and a 64-unit embedding this is the 114k-parameter CNN
    of the reference measurements (DESIGN.md, issue 2).
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, embedding_dim: int) -> None:
        super().__init__(in_shape, num_classes, embedding_dim)
        channels, height, width = in_shape
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

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, embedding_dim: int) -> None:
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

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, embedding_dim: int) -> None:
        super().__init__(in_shape, num_classes, embedding_dim)
        channels, height, width = in_shape
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


class CharGRU(Backbone):
    """A next-character language model: a 32-d character embedding, one GRU layer, a linear head.

    ``features`` is the GRU's hidden state at every position, ``head`` the logits of the next
    character there: the split kNN-Per's memory needs to store (hidden state at t, character
    at t + 1) pairs, as in kNN-LM (Khandelwal et al., ICLR 2020) and kNN-Per's Shakespeare
    experiment (Marfoq et al., ICML 2022). ``embedding_dim`` is the GRU's hidden size; every
    window starts from a zero state. 64k parameters at 128 hidden units and 98 symbols.
    """

    inputs = "text"

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, embedding_dim: int) -> None:
        super().__init__(in_shape, num_classes, embedding_dim)
        self.embed = nn.Embedding(num_classes, 32)
        self.gru = nn.GRU(32, embedding_dim, batch_first=True)
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def step(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run tokens (B, T) on from ``state`` (1, B, D) (zero if None): hidden states (B, D, T), new state.

        Exposure scoring walks a tree of candidate secrets with it, one character per level.
        """
        out, state = self.gru(self.embed(x), state)
        return out.transpose(1, 2), state

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)[0]  # (B, L) -> (B, D, L)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        # (B, D, *positions) -> (B, K, *positions); rows (n, D) -> (n, K) as they are.
        return self.classifier(z.movedim(1, -1)).movedim(-1, 1)


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


ModelFactory = type[Backbone]
MODELS: Registry[ModelFactory] = Registry("model", "model.name")
MODELS.register("cnn", CNN)
MODELS.register("cnn_bn", CNNBatchNorm)
MODELS.register("fedavgcnn", FedAvgCNN)
MODELS.register("char_gru", CharGRU)


def check_inputs(name: str, in_shape: tuple[int, ...], dataset: str) -> None:
    """Fail with one sentence when model ``name`` cannot read inputs of shape ``in_shape``."""
    wanted = MODELS.get(name).inputs
    given = "text" if len(in_shape) == 1 else "image"
    if wanted != given:
        fitting = ", ".join(n for n, f in MODELS.items() if f.inputs == given)
        raise ConfigError(
            f"model.name = {name!r} reads {wanted} inputs but data.dataset = {dataset!r} is "
            f"{given}; valid models for it: {fitting}."
        )


def build_model(
    name: str,
    in_shape: tuple[int, ...],
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


def get_weights(model: torch.nn.Module) -> Weights:
    """The model's state dict as numpy arrays (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
