from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmem.seeding import rng
from fedmem.training import SGDSettings, accuracy, logits_and_embeddings, softmax, train


class Linear2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _blobs(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    g = rng(0, "blobs")
    y = g.integers(0, 2, n)
    x = g.normal(size=(n, 2)) + np.where(y[:, None] == 1, 3.0, -3.0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _model(seed: int = 0) -> Linear2:
    torch.manual_seed(seed)
    return Linear2()


def test_train_learns_separable_data_and_is_deterministic() -> None:
    x, y = _blobs()
    settings = SGDSettings(lr=0.1, momentum=0.9, epochs=3, batch_size=16)
    m1, m2 = _model(), _model()
    s1 = train(m1, x, y, settings, rng(1, "fit"))
    s2 = train(m2, x, y, settings, rng(1, "fit"))
    assert s1 == s2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters(), strict=True))
    assert s1.samples == 3 * 200 and s1.steps == 3 * 13  # ceil(200 / 16) batches per epoch
    with torch.no_grad():
        assert float((m1(x).argmax(1) == y).float().mean()) > 0.97


def test_steps_override_epochs() -> None:
    x, y = _blobs(50)
    stats = train(_model(), x, y, SGDSettings(lr=0.1, epochs=9, steps=7, batch_size=16), rng(0, "fit"))
    assert stats.steps == 7 and stats.samples == 16 * 3 + 2 + 16 * 3  # 4 batches (16,16,16,2), then 3 of 16


def test_extra_loss_and_parameter_subsets_change_the_update() -> None:
    x, y = _blobs(64)
    base, pulled, frozen = _model(), _model(), _model()
    settings = SGDSettings(lr=0.1, epochs=1, batch_size=16)
    train(base, x, y, settings, rng(0, "fit"))
    train(pulled, x, y, settings, rng(0, "fit"), extra_loss=lambda m: 2.0 * pulled.fc.bias.pow(2).sum())
    assert float(pulled.fc.bias.detach().abs().sum()) < 0.5 * float(base.fc.bias.detach().abs().sum())
    bias0 = _model().fc.bias.detach().clone()
    train(frozen, x, y, settings, rng(0, "fit"), parameters=[frozen.fc.get_parameter("weight")])
    assert torch.equal(frozen.fc.bias, bias0)


def test_softmax_and_accuracy_by_hand() -> None:
    p = softmax(np.array([[0.0, np.log(3.0)], [1000.0, 0.0]]))
    np.testing.assert_allclose(p, [[0.25, 0.75], [1.0, 0.0]])
    assert accuracy(p, np.array([1, 1])) == 0.5
    assert np.isnan(accuracy(np.zeros((0, 2)), np.zeros(0, np.int64)))


def test_logits_and_embeddings_shapes() -> None:
    from fedmem.models import build_model

    model = build_model("cnn", (1, 28, 28), 10, 16, seed=0)
    logits, z = logits_and_embeddings(model, torch.zeros(7, 1, 28, 28), batch_size=3)
    assert logits.shape == (7, 10) and z.shape == (7, 16) and z.dtype == np.float32
