"""Who trains on what in an audit: canary plans, shadow subsets, subsampled federations.

Pure, seeded functions of labels and ids; :mod:`fedmem.federated_data` applies them
to the clients' data, and the audit recomputes them to know every example's
membership, so nothing about membership has to travel.

* **Image canaries** (after Carlini et al., "The Secret Sharer", USENIX Security 2019,
  adapted to images): a seeded set of pool images is held out of every client.
  Some become canaries: each chosen client appends ``per_repetition`` of them,
  each repeated ``r`` times for every ``r`` in ``repetitions``, with a random
  wrong label (so only memorization can make it likely). The same number are
  never inserted (the null: their exposure is about ``1 / ln 2`` bits), and
  ``references`` more are the candidates every canary's loss is ranked against.
* **Shadow federations** (Carlini et al., "Membership Inference Attacks From First
  Principles", S&P 2022): in shadow ``m`` each example of a client's train split
  is kept (IN) with probability 1/2, independently per (seed, shadow, client).
* **Subsampled federations** (Feldman and Zhang, NeurIPS 2020, at client granularity):
  federation ``f`` trains on a seeded random half of the seen clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmem.errors import ConfigError
from fedmem.seeding import rng

INSERTED, NEVER_INSERTED, REFERENCE = 0, 1, 2


@dataclass(frozen=True)
class CanaryPlan:
    """The held-out images of an audit and what each one is.

    All arrays have one entry per held-out image, in this order: inserted canaries
    (client by client, then repetition count by repetition count), never-inserted
    canaries, references.
    """

    index: np.ndarray  # (n,) position of the image among the held-out images
    label: np.ndarray  # (n,) the wrong label it carries
    kind: np.ndarray  # (n,) INSERTED, NEVER_INSERTED or REFERENCE
    owner: np.ndarray  # (n,) the inserting client's partition id, -1 if not inserted
    repetitions: np.ndarray  # (n,) how often it is repeated (0 if not inserted)

    def inserted_by(self, pid: int) -> np.ndarray:
        """Positions (into this plan) of the canaries client ``pid`` inserts."""
        return np.flatnonzero(self.owner == pid)

    @property
    def canaries(self) -> np.ndarray:
        """Positions of the inserted and never-inserted canaries (what exposure is measured on)."""
        return np.flatnonzero(self.kind != REFERENCE)

    @property
    def references(self) -> np.ndarray:
        """Positions of the reference candidates."""
        return np.flatnonzero(self.kind == REFERENCE)


def canary_clients(seed: int, seen: Sequence[int], count: int) -> list[int]:
    """The ``count`` seen clients that insert canaries (sorted)."""
    if count > len(seen):
        raise ConfigError(f"audit.canary_clients = {count} is more than the {len(seen)} seen clients")
    return sorted(int(p) for p in rng(seed, "canary-clients").choice(np.asarray(seen), count, replace=False))


def hold_out(
    labels: np.ndarray, num_classes: int, n_canaries: int, references: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pool indices held out of every client and the wrong label each gets.

    The first ``n_canaries`` are to be inserted, the next ``n_canaries`` never are, the last
    ``references`` are reference candidates. The draw depends only on the counts, so the
    pool can be split before the federation (and so the inserting clients) is known.
    """
    total = 2 * n_canaries + references
    if total >= len(labels) // 2:
        raise ConfigError(
            f"the audit holds out {total} images for canaries and references, too many for a pool of "
            f"{len(labels)}; lower audit.references, audit.canaries_per_repetition or audit.canary_clients"
        )
    r = rng(seed, "canary-pool")
    index = r.choice(len(labels), total, replace=False).astype(np.int64)
    shift = r.integers(1, num_classes, size=total)  # any label but the true one
    return index, ((np.asarray(labels)[index] + shift) % num_classes).astype(np.int64)


def plan_canaries(
    index: np.ndarray,
    label: np.ndarray,
    clients: Sequence[int],
    *,
    repetitions: Sequence[int],
    per_repetition: int,
) -> CanaryPlan:
    """Assign the held-out images of :func:`hold_out` to the inserting clients.

    Each client inserts ``per_repetition`` canaries for every count in ``repetitions``.
    """
    per_client = per_repetition * len(repetitions)
    inserted = per_client * len(clients)
    total = len(index)
    if total < 2 * inserted:
        raise ValueError(f"{total} held-out images cannot hold 2 x {inserted} canaries")
    kind = np.full(total, REFERENCE, np.int64)
    kind[:inserted] = INSERTED
    kind[inserted : 2 * inserted] = NEVER_INSERTED
    owner = np.full(total, -1, np.int64)
    reps = np.zeros(total, np.int64)
    block = np.repeat(np.asarray(repetitions, np.int64), per_repetition)  # one client's canaries
    for i, pid in enumerate(clients):
        owner[i * per_client : (i + 1) * per_client] = pid
        reps[i * per_client : (i + 1) * per_client] = block
    return CanaryPlan(np.asarray(index, np.int64), np.asarray(label, np.int64), kind, owner, reps)


def keep_mask(seed: int, shadow: int, pid: int, n: int) -> np.ndarray:
    """Which of client ``pid``'s ``n`` train examples shadow federation ``shadow`` trains on (p = 1/2)."""
    return rng(seed, "shadow-keep", shadow, pid).random(n) < 0.5


def participants(seed: int, subsample: int, seen: Sequence[int]) -> list[int]:
    """The seen clients that subsampled federation ``subsample`` trains on: a random half (sorted)."""
    half = max(1, len(seen) // 2)
    chosen = rng(seed, "subsample", subsample).choice(np.asarray(seen), half, replace=False)
    return sorted(int(p) for p in chosen)
