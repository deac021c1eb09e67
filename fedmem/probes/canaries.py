"""Canary generation for exposure tests (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary format is a template with ``{}`` slots, each filled with one symbol of
an alphabet: ``"the random number is {}{}{}{}{}{}{}{}{}"`` over the digits has
``10**9`` possible secrets. Some secrets are inserted into a client's training
data, each ``r`` times (the paper varies ``r`` to show exposure growing with
repetition); others, never inserted, are the references that
:mod:`fedmem.probes.exposure` ranks them against. All are drawn together
without replacement, so no canary is duplicated and no reference equals a
canary.

Randomness comes only from the generator passed in; derive it with
``fedmem.seeding.rng(seed, "canaries", client_id)`` so a run's canaries do not
depend on what else drew random numbers first.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fedmem.probes._validate import ProbeInputError

# rng.choice(space, replace=False) needs the space size to fit in an int64.
_MAX_ENUMERABLE = 2**63 - 1


@dataclass(frozen=True)
class CanaryFormat:
    """A secret template: literal text with bare ``{}`` slots, each filled from ``alphabet``.

    Parameters
    ----------
    template:
        E.g. ``"the random number is {}{}{}{}{}{}{}{}{}"``. ``{{`` and ``}}`` are literal braces;
        named or numbered fields are refused.
    alphabet:
        The distinct symbols a slot can take (characters or whole words).
    """

    template: str
    alphabet: tuple[str, ...] = tuple(string.digits)

    def __post_init__(self) -> None:
        try:
            # (field_name, format_spec, conversion) of each replacement field.
            fields = [(f, s, c) for _, f, s, c in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ProbeInputError(
                f"template {self.template!r} is not a valid format string: {exc}."
            ) from None
        if not fields:
            raise ProbeInputError(f"template {self.template!r} has no {{}} slot for the secret.")
        if any(f or s or c for f, s, c in fields):
            raise ProbeInputError(
                f"template {self.template!r} may only use bare {{}} slots, not names, indices or specs."
            )
        if len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ProbeInputError("alphabet must hold at least two distinct symbols.")

    @property
    def n_slots(self) -> int:
        """Number of ``{}`` slots in the template."""
        return sum(1 for _, f, _, _ in string.Formatter().parse(self.template) if f is not None)

    @property
    def space_size(self) -> int:
        """Number of distinct secrets, ``len(alphabet) ** n_slots`` (an exact Python int)."""
        return len(self.alphabet) ** self.n_slots

    def render(self, codes: NDArray[np.int64]) -> list[str]:
        """Fill the template once per row of symbol indices, shape ``(n, n_slots)``."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.n_slots:
            raise ProbeInputError(f"codes must have shape (n, {self.n_slots}), got {codes.shape}.")
        if codes.size and (codes.min() < 0 or codes.max() >= len(self.alphabet)):
            raise ProbeInputError(f"codes must index the alphabet, i.e. lie in [0, {len(self.alphabet)}).")
        return [self.template.format(*(self.alphabet[c] for c in row)) for row in codes.tolist()]


def sample_distinct_codes(fmt: CanaryFormat, n: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Draw ``n`` distinct secrets uniformly without replacement, as symbol indices ``(n, n_slots)``."""
    if n < 0:
        raise ProbeInputError(f"the number of secrets must be non-negative, got {n}.")
    if n > fmt.space_size:
        raise ProbeInputError(
            f"{n} distinct secrets requested but the format has only {fmt.space_size}; "
            "add slots or symbols to the canary format."
        )
    k, slots = len(fmt.alphabet), fmt.n_slots
    if fmt.space_size <= _MAX_ENUMERABLE:
        # Sample secret numbers, then write each in base k, most significant slot first.
        numbers = rng.choice(fmt.space_size, size=n, replace=False).astype(np.int64)
        powers = k ** np.arange(slots - 1, -1, -1, dtype=np.int64)  # (slots,)
        return (numbers[:, None] // powers[None, :]) % k
    # Too many secrets to number in int64: draw slots independently and redraw the
    # (astronomically rare) duplicate rows until all rows differ.
    codes = rng.integers(0, k, size=(n, slots), dtype=np.int64)
    while True:
        _, first = np.unique(codes, axis=0, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        if not dup.any():
            return codes
        codes[dup] = rng.integers(0, k, size=(int(dup.sum()), slots), dtype=np.int64)


@dataclass(frozen=True)
class CanarySet:
    """Inserted canaries with their repetition counts, and never-inserted references.

    ``canaries[i]`` is to be inserted ``repetitions[i]`` times; no string appears twice
    across ``canaries`` and ``references``.
    """

    format: CanaryFormat
    canaries: tuple[str, ...]
    repetitions: tuple[int, ...]
    references: tuple[str, ...]

    def insertions(self) -> list[str]:
        """The training strings to add: each canary repeated its count, in canary order."""
        return [c for c, r in zip(self.canaries, self.repetitions, strict=True) for _ in range(r)]


def make_canaries(
    fmt: CanaryFormat,
    repetitions: Sequence[int],
    n_references: int,
    rng: np.random.Generator,
) -> CanarySet:
    """Draw one canary per entry of ``repetitions`` and ``n_references`` references.

    Parameters
    ----------
    fmt:
        The secret format.
    repetitions:
        How many times each canary is inserted, e.g. ``(1, 1, 4, 16)`` for four canaries.
    n_references:
        Never-inserted secrets to rank the canaries against (the paper's candidate set).
    rng:
        The only source of randomness, e.g. ``fedmem.seeding.rng(seed, "canaries", client_id)``.
    """
    reps = tuple(int(r) for r in repetitions)
    if not reps or min(reps) < 1:
        raise ProbeInputError("repetitions must list at least one canary, each inserted at least once.")
    if n_references < 1:
        raise ProbeInputError(f"n_references must be at least 1, got {n_references}.")
    texts = fmt.render(sample_distinct_codes(fmt, len(reps) + n_references, rng))
    return CanarySet(fmt, tuple(texts[: len(reps)]), reps, tuple(texts[len(reps) :]))
