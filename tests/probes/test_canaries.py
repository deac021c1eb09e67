"""Canary formats and seeded, duplicate-free sampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import stats

from fedmem.probes import CanaryFormat, ProbeInputError, make_canaries, sample_distinct_codes
from fedmem.seeding import rng

NINE_DIGITS = CanaryFormat("the random number is {}{}{}{}{}{}{}{}{}")


class _ScriptedGenerator:
    """Stands in for numpy's Generator and returns preset draws, to pin down decoding exactly."""

    def __init__(self, *draws: NDArray[np.int64]) -> None:
        self.draws = list(draws)

    def choice(self, a: int, size: int, replace: bool) -> NDArray[np.int64]:
        assert not replace
        return self.draws.pop(0)

    def integers(self, low: int, high: int, size: tuple[int, int], dtype: type) -> NDArray[np.int64]:
        return self.draws.pop(0)


def test_format_counts_slots_and_secrets() -> None:
    assert NINE_DIGITS.n_slots == 9
    assert NINE_DIGITS.space_size == 10**9
    assert CanaryFormat("{} {}", alphabet=("red", "green", "blue")).space_size == 9


def test_render_fills_slots_in_order_and_keeps_escaped_braces() -> None:
    fmt = CanaryFormat("{{pin}} {}{}-{}")
    assert fmt.render(np.array([[1, 2, 3], [0, 0, 9]])) == ["{pin} 12-3", "{pin} 00-9"]
    words = CanaryFormat("my {} is {}", alphabet=("cat", "dog"))
    assert words.render(np.array([[1, 0]])) == ["my dog is cat"]


def test_codes_are_secret_numbers_written_most_significant_slot_first() -> None:
    scripted = _ScriptedGenerator(np.array([123456789, 7]))
    codes = sample_distinct_codes(NINE_DIGITS, 2, scripted)  # type: ignore[arg-type]
    assert NINE_DIGITS.render(codes) == ["the random number is 123456789", "the random number is 000000007"]


def test_huge_spaces_redraw_duplicate_rows() -> None:
    fmt = CanaryFormat("{}" * 64, alphabet=("0", "1"))  # 2**64 secrets: more than an int64 can number
    first = np.array([[0] * 64, [1] * 64, [0] * 64])
    scripted = _ScriptedGenerator(first, np.array([[1] + [0] * 63]))
    codes = sample_distinct_codes(fmt, 3, scripted)  # type: ignore[arg-type]
    np.testing.assert_array_equal(codes, [[0] * 64, [1] * 64, [1] + [0] * 63])


def test_huge_spaces_sample_distinct_rows_with_a_real_generator() -> None:
    fmt = CanaryFormat("{}" * 20)  # 10**20 secrets
    codes = sample_distinct_codes(fmt, 500, rng(0, "canaries"))
    assert codes.shape == (500, 20)
    assert len({tuple(r) for r in codes.tolist()}) == 500
    assert codes.min() >= 0 and codes.max() <= 9


def test_slots_are_uniform() -> None:
    codes = sample_distinct_codes(CanaryFormat("{}" * 6), 20_000, rng(1, "canaries"))
    for slot in range(6):
        counts = np.bincount(codes[:, slot], minlength=10)
        assert stats.chisquare(counts).pvalue > 1e-4


def test_make_canaries_is_seeded_distinct_and_repeats_as_asked() -> None:
    reps = (1, 1, 4, 16)
    a = make_canaries(NINE_DIGITS, reps, 1000, rng(5, "canaries", 3))
    b = make_canaries(NINE_DIGITS, reps, 1000, rng(5, "canaries", 3))
    c = make_canaries(NINE_DIGITS, reps, 1000, rng(5, "canaries", 4))
    assert a == b
    assert a.canaries != c.canaries
    assert len(a.canaries) == 4 and len(a.references) == 1000
    assert len(set(a.canaries) | set(a.references)) == 1004
    assert all(s.startswith("the random number is ") and len(s) == 30 for s in a.canaries)
    counts = Counter(a.insertions())
    assert [counts[c] for c in a.canaries] == [1, 1, 4, 16]
    assert len(a.insertions()) == 22


def test_a_small_space_can_be_used_up_exactly() -> None:
    fmt = CanaryFormat("{}{}")
    s = make_canaries(fmt, (2, 3), 98, rng(0))
    assert sorted(s.canaries + s.references) == [f"{i:02d}" for i in range(100)]
    with pytest.raises(ProbeInputError, match="only 100"):
        make_canaries(fmt, (2, 3), 99, rng(0))


@pytest.mark.parametrize(
    ("template", "alphabet", "message"),
    [
        ("no slot here", tuple("01"), "no {} slot"),
        ("{0}{1}", tuple("01"), "bare {} slots"),
        ("{name}", tuple("01"), "bare {} slots"),
        ("{:>3}", tuple("01"), "bare {} slots"),
        ("{!r}", tuple("01"), "bare {} slots"),
        ("{", tuple("01"), "not a valid format string"),
        ("{}", ("0", "0"), "two distinct symbols"),
        ("{}", ("0",), "two distinct symbols"),
    ],
)
def test_bad_formats_are_refused(template: str, alphabet: tuple[str, ...], message: str) -> None:
    with pytest.raises(ProbeInputError, match=message):
        CanaryFormat(template, alphabet)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ProbeInputError, match="at least once"):
        make_canaries(NINE_DIGITS, (1, 0), 10, rng(0))
    with pytest.raises(ProbeInputError, match="at least one canary"):
        make_canaries(NINE_DIGITS, (), 10, rng(0))
    with pytest.raises(ProbeInputError, match="n_references"):
        make_canaries(NINE_DIGITS, (1,), 0, rng(0))
    with pytest.raises(ProbeInputError, match="shape"):
        NINE_DIGITS.render(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ProbeInputError, match="index the alphabet"):
        NINE_DIGITS.render(np.full((1, 9), 10))
