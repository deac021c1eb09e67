"""Every random number in fedmem derives from (seed, purpose, round, client id).

There is no global random state: each consumer asks for a generator keyed by
what it is for, so results do not depend on execution order, on which Ray actor
ran a client, or on how many clients were sampled before.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so that numpy-only modules (probes) stay torch-free
    import torch


def _key(part: int | str) -> int:
    # str keys are hashed with crc32 because Python's hash() is salted per process.
    if isinstance(part, str):
        return zlib.crc32(part.encode())
    if part < 0:
        raise ValueError(f"seed keys must be non-negative, got {part}")
    return int(part)


def seed_sequence(seed: int, *keys: int | str) -> np.random.SeedSequence:
    """The :class:`numpy.random.SeedSequence` for ``seed`` and a tuple of keys."""
    return np.random.SeedSequence([_key(seed), *(_key(k) for k in keys)])


def rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy generator for ``(seed, *keys)``, e.g. ``rng(seed, "sample", round)``."""
    return np.random.default_rng(seed_sequence(seed, *keys))


def torch_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit integer seed for torch, derived like :func:`rng`."""
    return int(seed_sequence(seed, *keys).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU :class:`torch.Generator` for ``(seed, *keys)``."""
    import torch

    g = torch.Generator()
    g.manual_seed(torch_seed(seed, *keys))
    return g
