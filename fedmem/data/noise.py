"""Label noise: a seeded fraction of a client's training labels flipped to other classes.

The measurement of Arpit et al., "A Closer Look at Memorization in Deep Networks" (ICML 2017),
in federations: how much of the noise a model fits (accuracy on the flipped examples against
their *noisy* labels) against how well it still predicts their true class. ``data.label_noise``
is the fraction flipped in each client of ``data.noisy_clients`` (every seen client when empty).

Client ``c`` with ``n`` training examples flips exactly ``round(fraction * n)`` of them, chosen
uniformly without replacement; each flipped label becomes a class drawn uniformly from the
``K - 1`` others (``(y + u) mod K`` with ``u`` uniform on ``1..K-1``). Both draws come from
``rng(seed, "label-noise", c)``, so the flips are a pure function of (seed, client, labels,
fraction) and evaluation recomputes them instead of storing them. Validation and test splits
are never flipped. :mod:`fedmem.federated_data` applies :func:`flip_labels` to the train split
where a client's examples are read, after its task (``data.tasks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedmem.seeding import rng


@dataclass(frozen=True)
class LabelFlips:
    """What label noise did to one client's training labels.

    ``mask[i]``: whether example ``i`` was flipped; ``labels``: the labels after flipping
    (the original where ``mask`` is False); ``original``: the labels before.
    """

    mask: NDArray[np.bool_]  # (n,)
    labels: NDArray[np.int64]  # (n,)
    original: NDArray[np.int64]  # (n,)

    @property
    def count(self) -> int:
        """Number of flipped examples."""
        return int(self.mask.sum())


def flip_labels(
    seed: int, client: int, labels: NDArray[np.integer], fraction: float, num_classes: int
) -> LabelFlips:
    """Flip ``round(fraction * n)`` of client ``client``'s ``n`` labels, each to another class.

    Parameters
    ----------
    seed:
        The run seed.
    client:
        The client's partition id (keys the generator).
    labels:
        Class labels (n,), in ``0..num_classes - 1``.
    fraction:
        In [0, 1].
    num_classes:
        K >= 2.

    Returns
    -------
    LabelFlips
        The flip mask, the new labels and the original ones (new int64 arrays).
    """
    original = np.asarray(labels, dtype=np.int64).copy()
    if original.ndim != 1:
        raise ValueError(
            f"label noise flips one class label per example, got labels of shape {original.shape}"
        )
    if not 0 <= fraction <= 1:
        raise ValueError(f"the fraction of flipped labels must be in [0, 1], got {fraction}")
    n = len(original)
    count = round(fraction * n)
    mask = np.zeros(n, dtype=bool)
    new = original.copy()
    if count == 0:
        return LabelFlips(mask, new, original)
    if num_classes < 2:
        raise ValueError(f"flipping a label needs at least 2 classes, got {num_classes}")
    g = rng(seed, "label-noise", client)
    chosen = np.sort(g.choice(n, size=count, replace=False))
    mask[chosen] = True
    new[chosen] = (original[chosen] + g.integers(1, num_classes, size=count)) % num_classes
    return LabelFlips(mask, new, original)


def noisy_clients(chosen: Sequence[int], seen: Sequence[int]) -> tuple[int, ...]:
    """The clients whose train labels are flipped: ``data.noisy_clients``, or every seen client if empty."""
    return tuple(sorted(chosen)) if chosen else tuple(sorted(seen))
