"""Federated task settings: each client's examples turned into a task of its own (``data.tasks``).

Personalized federated learning is meta-learning with clients as tasks. Yin et al.,
"Meta-Learning without Memorization" (ICLR 2020), separate two regimes, and these transforms
build both from any image data set by a seeded, documented rewrite of each client's examples:

``permuted``
    Client ``c`` relabels every example: class ``y`` becomes ``pi_c[y]``, where ``pi_c`` is a
    permutation of the classes drawn from ``rng(seed, "task-permutation", c)``. The same image
    carries different labels at different clients, so the tasks are *mutually exclusive*: no
    single model solves them all, and a client's own data is needed to adapt.

``permuted_marked``
    The same permutations, and every image of client ``c`` also carries a marker that identifies
    ``c``: the inputs now say which task they belong to, so one model can solve every training
    client zero-shot without looking at its data. This is the *non-mutually-exclusive* setting in
    which Yin et al. show that meta-learning memorizes the training tasks instead of learning to
    adapt; clients held out of training have markers (and permutations) never seen in training.

The marker is client ``c``'s id written in binary, :data:`MARKER_BITS` = 16 bits (ids up to
65,535), in the image's top-left corner: bit ``k`` (least significant first) is a square of
``cell`` x ``cell`` pixels at row ``(k // 4) * cell``, column ``(k % 4) * cell``, set in every
channel to 255 (the images' maximum) for a 1 and to 0 for a 0. The whole ``4 cell`` x ``4 cell``
square is overwritten, so two clients' markers differ in at least one cell whatever the image
was. Squares of ``cell >= 2`` pixels survive the 2 x 2 pooling of the small CNNs.

Everything here is a pure function of its arguments; :mod:`fedmem.federated_data` applies
:func:`apply_task` wherever a client's examples are read.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fedmem.errors import ConfigError
from fedmem.seeding import rng

TASKS = ("", "permuted", "permuted_marked")  # "" = the data as they are
MARKER_BITS = 16
_MARKER_SIDE = 4  # bits per row and per column of the marker's square
MAX_MARKED_CLIENTS = 1 << MARKER_BITS


def permutation(seed: int, client: int, num_classes: int) -> NDArray[np.int64]:
    """Client ``client``'s label permutation ``pi``: class ``y`` becomes ``pi[y]``.

    Parameters
    ----------
    seed:
        The run seed.
    client:
        The client's partition id.
    num_classes:
        Number of classes of the data set.

    Returns
    -------
    numpy.ndarray
        int64, shape (num_classes,), a permutation of ``0..num_classes - 1``.
    """
    return rng(seed, "task-permutation", client).permutation(num_classes).astype(np.int64)


def relabel(y: NDArray[np.integer], pi: NDArray[np.int64]) -> NDArray[np.int64]:
    """Labels ``y`` (any shape) mapped through the permutation ``pi``: ``pi[y]``, a new int64 array."""
    return pi[np.asarray(y, dtype=np.int64)]


def marker_bits(client: int) -> NDArray[np.bool_]:
    """The :data:`MARKER_BITS` bits of ``client``'s id, least significant first."""
    if not 0 <= client < MAX_MARKED_CLIENTS:
        raise ConfigError(
            f"client {client} cannot be marked: the corner marker has {MARKER_BITS} bits, "
            f"so data.tasks = 'permuted_marked' allows at most {MAX_MARKED_CLIENTS} clients"
        )
    return (client >> np.arange(MARKER_BITS)) & 1 == 1


def draw_marker(x: NDArray[np.uint8], client: int, cell: int) -> NDArray[np.uint8]:
    """Images ``x`` with ``client``'s marker in their top-left corner (a new array; ``x`` is not changed).

    Parameters
    ----------
    x:
        Images, shape (n, C, H, W), uint8.
    client:
        The client's partition id, written in binary (see the module docstring).
    cell:
        Side of one bit's square in pixels; the marker covers ``4 cell`` x ``4 cell`` pixels.

    Returns
    -------
    numpy.ndarray
        uint8, shape (n, C, H, W).
    """
    side = _MARKER_SIDE * cell
    if x.ndim != 4 or min(x.shape[2:]) < side:
        raise ConfigError(
            f"data.marker_cell = {cell} draws a {side} x {side} pixel marker, which needs images of "
            f"shape (n, C, H, W) with H, W >= {side}, got {x.shape}; lower data.marker_cell."
        )
    grid = marker_bits(client).reshape(_MARKER_SIDE, _MARKER_SIDE)  # row k // 4, column k % 4
    patch = np.kron(grid, np.ones((cell, cell), dtype=bool)).astype(np.uint8) * np.uint8(255)  # (side, side)
    out = np.array(x, dtype=np.uint8, copy=True)
    out[:, :, :side, :side] = patch
    return out


def apply_task(
    task: str,
    x: NDArray[np.uint8],
    y: NDArray[np.integer],
    *,
    seed: int,
    client: int,
    num_classes: int,
    cell: int,
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Client ``client``'s examples ``(x, y)`` as its task ``task`` sees them.

    Parameters
    ----------
    task:
        One of :data:`TASKS`.
    x, y:
        Images (n, C, H, W) uint8 and their class labels (n,).
    seed, client, num_classes:
        Key the permutation (:func:`permutation`); ``client`` is also the marker's code.
    cell:
        Marker cell size in pixels (``permuted_marked`` only).

    Returns
    -------
    tuple of numpy.ndarray
        The images (marked or unchanged) and the relabelled int64 labels; for ``task = ""`` the
        inputs themselves, labels as int64.
    """
    if task not in TASKS:
        raise ConfigError(f"data.tasks = {task!r} is not known; valid choices: {_choices()}")
    if not task:
        return x, np.asarray(y, dtype=np.int64)
    labels = relabel(y, permutation(seed, client, num_classes))
    if task == "permuted_marked":
        x = draw_marker(x, client, cell)
    return x, labels


def _choices() -> str:
    return ", ".join(repr(t) for t in TASKS)
