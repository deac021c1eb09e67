"""Naturally federated text: the Python standard library's modules as clients, as next-character windows.

The corpus ``stdlib_text`` is a snapshot shipped in the package
(``fedmem/data/corpora/stdlib-3.11.7.tar.xz``, 0.9 MB): the 168 top-level ``.py``
modules of CPython 3.11.7's standard library (packages such as ``email`` or
``asyncio`` are not included), 4.7 million characters, from 2 kB
(``__hello__``) to 250 kB (``typing``...). One module is one client: its authors, era and
style differ from the next module's, which gives real, non-synthetic
heterogeneity with no download. The snapshot, not the running interpreter's
library, is read, so every machine and Python version gets the same corpus;
its SHA-256 is checked on load. The modules are distributed under the Python
Software Foundation License, whose text ships beside the archive
(``stdlib-3.11.7.LICENSE.txt``).

Vocabulary (:data:`VOCABULARY`, 98 symbols): id 0 is the out-of-vocabulary symbol
(any other character, e.g. non-ASCII letters in docstrings), ids 1 and 2 are
tab and newline, ids 3-97 the printable ASCII characters from space to ``~``.

Each module's characters are cut into disjoint blocks of ``seq_len + 1``
characters (the remainder is dropped): a block's first ``seq_len`` characters
are the input, its last ``seq_len`` the targets (the next character at every
position). Blocks keep their order, so a client's train / validation / test
splits taken as contiguous runs of blocks share no character.
"""

from __future__ import annotations

import functools
import hashlib
import io
import lzma
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedmem.errors import DataError

OOV = 0
VOCABULARY = "\x00\t\n" + "".join(chr(c) for c in range(32, 127))  # position = token id; "\x00" = OOV
_TABLE = np.zeros(128, np.uint8)  # code point -> token id; everything else is OOV
for _id, _char in enumerate(VOCABULARY[1:], start=1):
    _TABLE[ord(_char)] = _id

CORPORA = Path(__file__).parent / "corpora"
STDLIB_ARCHIVE = "stdlib-3.11.7.tar.xz"
STDLIB_SHA256 = "82bc07111d077b6eda543328bfcf560036af9738a7565e9caf07bb15c1636ec3"


def encode(text: str) -> NDArray[np.uint8]:
    """Token ids of ``text`` under :data:`VOCABULARY` (characters outside it become :data:`OOV`)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    out = np.zeros(len(points), np.uint8)
    ascii_ = points < 128
    out[ascii_] = _TABLE[points[ascii_]]
    return out


def decode(tokens: NDArray[np.integer]) -> str:
    """The text of token ids (OOV shown as ``"\\x00"``)."""
    return "".join(VOCABULARY[int(t)] for t in np.asarray(tokens).reshape(-1))


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """A corpus of named documents, each the natural data of one client.

    Attributes
    ----------
    name:
        Registry name ("stdlib_text").
    documents:
        Document names (module names), sorted.
    tokens:
        One read-only uint8 array of token ids per document.
    """

    name: str
    documents: tuple[str, ...]
    tokens: tuple[NDArray[np.uint8], ...]

    @property
    def num_classes(self) -> int:
        """The vocabulary size: a next-character model has one class per symbol."""
        return len(VOCABULARY)


@dataclass(frozen=True)
class SnapshotSource:
    """A text corpus shipped in the package as a ``.tar.xz`` of text files, one per client."""

    name: str
    archive: str
    sha256: str

    def load(self, root: Path, *, download: bool) -> TextCorpus:
        """Read the shipped archive (``root`` and ``download`` play no role: nothing is fetched)."""
        return _read_snapshot(self.name, CORPORA / self.archive, self.sha256)


@functools.lru_cache(maxsize=2)
def _read_snapshot(name: str, path: Path, sha256: str) -> TextCorpus:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"the {name} corpus {path} cannot be read ({exc}); reinstall fedmem, which ships it."
        ) from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise DataError(
            f"the {name} corpus {path} has SHA-256 {digest}, not the pinned {sha256}: it was changed or "
            "truncated, so results would not match other machines; restore it from the fedmem repository."
        )
    documents, tokens = [], []
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(raw)), mode="r:") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is None:
                continue
            array = encode(handle.read().decode("utf-8"))
            array.setflags(write=False)
            documents.append(member.name.removesuffix(".py"))
            tokens.append(array)
    return TextCorpus(name, tuple(documents), tuple(tokens))


def windows(tokens: NDArray[np.uint8], seq_len: int) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Cut one document into disjoint next-character windows.

    Parameters
    ----------
    tokens:
        The document's token ids, shape (n,).
    seq_len:
        Characters per input window.

    Returns
    -------
    x, y:
        uint8 arrays of shape ``(n // (seq_len + 1), seq_len)``: inputs and next-character targets
        (``y[i, t] = x[i, t + 1]`` inside a window; the last target is the block's last character).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    blocks = np.asarray(tokens)[: len(tokens) // (seq_len + 1) * (seq_len + 1)].reshape(-1, seq_len + 1)
    return blocks[:, :-1], blocks[:, 1:]


def corpus_windows(
    corpus: TextCorpus, seq_len: int
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], NDArray[np.int64]]:
    """Every document's windows stacked in document order, with the document id of each window.

    Returns
    -------
    x, y:
        (N, seq_len) uint8 inputs and targets.
    groups:
        (N,) int64 index into ``corpus.documents``: the natural client id.
    """
    parts = [windows(t, seq_len) for t in corpus.tokens]
    x = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, seq_len), np.uint8)
    y = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, seq_len), np.uint8)
    groups = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p[0]) for p in parts])
    return x, y, groups


def canary_windows(
    lines: list[NDArray[np.uint8]], filler: NDArray[np.uint8], seq_len: int, rng: np.random.Generator
) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """One training window per canary occurrence: the canary line, then a run of the client's own text.

    Each occurrence starts its window, so the model reads it from the zero state exactly as
    exposure scoring does (:mod:`fedmem.canary_scoring`), and no occurrence is cut in two by a
    window boundary; the rest of the window is ``filler`` (the client's train text) from a
    random offset, so the canary sits in the client's own kind of text.

    Parameters
    ----------
    lines:
        Token ids of each occurrence (e.g. ``encode("\\n" + canary + "\\n")``), each at most
        ``seq_len + 1`` long.
    filler:
        The client's train text as token ids.
    seq_len:
        Window length.
    rng:
        Chooses the filler offsets.
    """
    blocks = np.zeros((len(lines), seq_len + 1), np.uint8)
    for i, line in enumerate(lines):
        if len(line) > seq_len + 1:
            raise ValueError(f"a canary line of {len(line)} tokens does not fit a window of {seq_len + 1}")
        need = seq_len + 1 - len(line)
        text = filler if len(filler) >= need else np.resize(filler, need)  # tiny clients: wrap around
        start = int(rng.integers(0, len(text) - need + 1))
        blocks[i, : len(line)] = line
        blocks[i, len(line) :] = text[start : start + need]
    return blocks[:, :-1], blocks[:, 1:]
