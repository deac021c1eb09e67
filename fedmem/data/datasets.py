"""Image data sets held in memory as uint8 arrays, read from local copies first.

A data set is loaded once per process (a Ray actor keeps it for its lifetime)
as the train split followed by the test split; the engine re-splits it per
client (see :mod:`fedmem.data.partition`), so the original split boundary
plays no role.

MNIST, Fashion-MNIST and EMNIST share the idx file format of LeCun et al.: a 4-byte
magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the raw values (EMNIST stores its images
transposed). CIFAR-10 and CIFAR-100 are pickled batches of 32 x 32 RGB images
(:func:`read_cifar_batch`). We parse both with numpy rather than through
torchvision so that a system copy (Debian's ``dataset-fashion-mnist`` package
ships the four ``.gz`` files) is usable without copying it under the data root,
and so that a corrupt file gives an error naming it instead of a reshape
failure deep inside torchvision.

Lookup order for a data set (:data:`SEARCH_PATHS`): directories under the
data root, then system directories, then, if ``download`` is on, torchvision's
downloader writing where torchvision keeps the data set (``<root>/<TorchvisionClass>/raw``
for idx files, ``<root>/cifar-10-batches-py`` for CIFAR-10...).

Decoded arrays are cached as ``.npy`` files (:func:`cache_dirs` says where), which
later processes map read-only (``np.load(..., mmap_mode="r")``) instead of
decompressing and parsing the source files again: Fashion-MNIST loads in 10 ms
instead of 0.4-0.9 s, and the Ray actors of a run share one copy of
the pages through the page cache instead of holding 55 MB each. A cache entry
is named after its source files' paths, sizes, modification and change times
and inode numbers, so a changed, replaced or moved source is never served from
a stale entry; files are written under a temporary name and renamed into
place, so a concurrent reader sees a whole file or none. If no cache directory
is writable, loading works as without a cache. Delete cache files (any time)
rather than edit them: a process mapping one would see an edit, and crash on a
truncation.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import tempfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from fedmem.data.text import STDLIB_ARCHIVE, STDLIB_SHA256, SnapshotSource, TextCorpus
from fedmem.errors import DataError
from fedmem.registry import Registry

# Where each data set's files are looked for, in order; "{root}" is the
# data root given to load_dataset. A module constant so tests (and users with an
# unusual layout) can change it.
SEARCH_PATHS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": (
        "{root}/FashionMNIST/raw",
        "{root}/fashion-mnist",
        "/usr/share/datasets/fashion-mnist",
    ),
    "mnist": ("{root}/MNIST/raw", "{root}/mnist"),
    "cifar10": ("{root}/cifar-10-batches-py", "{root}/cifar10"),
    "cifar100": ("{root}/cifar-100-python", "{root}/cifar100"),
    # One directory serves every EMNIST split: the files are named after theirs.
    "emnist": ("{root}/EMNIST/raw", "{root}/emnist"),
    "emnist_balanced": ("{root}/EMNIST/raw", "{root}/emnist"),
    "emnist_letters": ("{root}/EMNIST/raw", "{root}/emnist"),
}

# MNIST's (images, labels) file stems of the two splits, train first; each file may be
# stored plain or gzip-compressed with a ".gz" suffix.
IDX_SPLITS: tuple[tuple[str, str], ...] = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)


def emnist_stems(split: str) -> tuple[tuple[str, str], ...]:
    """EMNIST's idx file stems of one split ("byclass"), as :data:`IDX_SPLITS` lists MNIST's."""
    return tuple(
        (f"emnist-{split}-{part}-images-idx3-ubyte", f"emnist-{split}-{part}-labels-idx1-ubyte")
        for part in ("train", "test")
    )


_IDX_UBYTE = 0x08  # idx type code of unsigned bytes, the only type these data sets use

# The .npy cache of decoded data sets (see the module docstring and cache_dirs).
CACHE_ENV = "FEDMEM_DATA_CACHE"  # a directory to use instead of the defaults, or "off"
CACHE_SUBDIR = "fedmem-cache"  # under the data root
_CACHE_FORMAT = 1  # part of every entry's key: bump it when the layout of the cached arrays changes


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image data set, train split followed by test split.

    Attributes
    ----------
    name:
        Registry name of the data set ("fashion_mnist").
    x:
        Images, shape (N, C, H, W), uint8 (kept as bytes: 70k x 784 B = 55 MB;
        convert per client with :func:`to_tensor`). Read-only, because the
        array is shared through the per-process cache, and usually a view of
        a read-only memory map of the ``.npy`` cache: copy it (``x[idx]``,
        ``x.copy()``) before changing anything.
    y:
        Labels in ``[0, num_classes)``, shape (N,), int64, read-only.
    num_classes:
        Number of classes.
    mean, std:
        Per-channel mean and standard deviation of ``x / 255`` on the train
        split, for normalisation.
    """

    name: str
    x: NDArray[np.uint8]
    y: NDArray[np.int64]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class DatasetSource(Protocol):
    """What the :data:`DATASETS` registry holds: something that loads one data set."""

    def load(self, root: Path, *, download: bool) -> ImageData | TextCorpus:
        """Load the whole data set, looking under ``root`` first."""
        ...


@dataclass(frozen=True)
class _FileSource(ABC):
    """The search, download and cache logic shared by the image data sets read from local files.

    A subclass is a frozen dataclass adding its own fields; it says which files
    make up the data set (:meth:`_stems`), where torchvision's downloader puts
    them (:meth:`_download_dir`) and how to decode them (:meth:`_decode`).

    Attributes
    ----------
    name:
        Registry name, also the key into :data:`SEARCH_PATHS`.
    title:
        Name used in messages ("Fashion-MNIST").
    torchvision_class:
        Name of the ``torchvision.datasets`` class that downloads it.
    num_classes, mean, std:
        See :class:`ImageData`.
    local_fix:
        How to get the files without internet, ending the "not found" error;
        ``{root}`` is replaced by the data root.
    """

    name: str
    title: str
    torchvision_class: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    local_fix: str

    # What the files are called in messages, and the suffixes each stem may be stored under.
    _kind: ClassVar[str]
    _suffixes: ClassVar[tuple[str, ...]] = ("",)

    @abstractmethod
    def _stems(self) -> tuple[str, ...]:
        """The names of the files that make up the data set, without suffix."""

    @abstractmethod
    def _download_dir(self, root: Path) -> Path:
        """The directory torchvision's downloader leaves the files in."""

    @abstractmethod
    def _decode(self, files: dict[str, Path]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """Images (N, C, H, W) and labels (N,), train split then test split, from ``files`` (no cache)."""

    def _download_options(self) -> dict[str, str]:
        """Keyword arguments of the torchvision class beyond root, train and download."""
        return {}

    def load(self, root: Path, *, download: bool) -> ImageData:
        """Read the files from the first search directory holding all of them, else download them.

        Raises
        ------
        DataError
            If no directory holds the files and downloading is off or fails, or
            if a file is corrupt.
        """
        searched = [Path(template.replace("{root}", str(root))) for template in SEARCH_PATHS[self.name]]
        lacking: dict[Path, str] = {}  # directory holding some of the files -> the first one it lacks
        for directory in searched:
            files, missing = _find_files(directory, self._stems(), self._suffixes)
            if not missing:
                return self._read_cached(files, root)
            if files:
                lacking[directory] = missing[0]

        download_dir = self._download_dir(root)
        if not download:
            reason = "downloading is off"
        else:
            try:
                self._download(root)
            # torchvision raises URLError, RuntimeError, OSError... depending on
            # where the download breaks; each means the same thing here.
            except Exception as exc:
                detail = " ".join(str(exc).split()) or type(exc).__name__
                reason = f"the torchvision download into {root} failed ({detail})"
            else:
                files, missing = _find_files(download_dir, self._stems(), self._suffixes)
                if not missing:
                    return self._read_cached(files, root)
                if files:
                    reason = f"the torchvision download left {download_dir} without {missing[0]}"
                else:
                    reason = f"the torchvision download left no {self._kind} in {download_dir}"
        places = [f"{d} (which lacks {lacking[d]})" if d in lacking else str(d) for d in searched]
        online = "run with internet access" if download else "enable downloading and run with internet access"
        raise DataError(
            f"{self.title} was not found in {', '.join(places)} and {reason}; "
            f"{self.local_fix.replace('{root}', str(root))} or {online} "
            f"so torchvision can download it into {root}."
        )

    def _download(self, root: Path) -> None:
        # Imported here: torchvision costs ~1 s to import and is only needed
        # on a machine without a local copy.
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.torchvision_class)
        # train=True: each of these classes fetches both splits' files at once.
        dataset_class(str(root), train=True, download=True, **self._download_options())

    def _read_cached(self, files: dict[str, Path], root: Path) -> ImageData:
        x, y = _read_cached(self.name, files, root, lambda: self._decode(files))
        return ImageData(self.name, x, y, self.num_classes, self.mean, self.std)

    def _labels(self, labels: NDArray[np.integer], path: Path, *, offset: int = 0) -> NDArray[np.int64]:
        """``labels - offset`` as int64, checked to lie in ``[0, num_classes)``; ``path`` is their file."""
        shifted = labels.astype(np.int64) - offset
        if shifted.size and (shifted.min() < 0 or shifted.max() >= self.num_classes):
            bad = int(shifted.min() if shifted.min() < 0 else shifted.max()) + offset
            classes = f"{self.num_classes} classes"
            if offset:
                classes += f", labelled {offset} to {offset + self.num_classes - 1} in its files"
            raise DataError(
                f"{path} has label {bad} but {self.title} has {classes}; "
                "the file is from another data set, replace it."
            )
        return shifted


@dataclass(frozen=True)
class IdxSource(_FileSource):
    """An MNIST-format data set stored as idx files: images and labels of a train and a test split.

    Attributes
    ----------
    name, title, torchvision_class, num_classes, mean, std, local_fix:
        See :class:`_FileSource`; torchvision writes the files into
        ``<root>/<torchvision_class>/raw``.
    stems:
        (images, labels) file stems of the train split, then the test split; each
        file may be stored plain or gzip-compressed with a ".gz" suffix.
    split:
        The ``split`` argument of the torchvision class (EMNIST's "byclass"), if it takes one.
    transpose:
        Whether the files store images transposed (EMNIST): swap height and width
        so the characters come out upright.
    label_offset:
        The smallest label in the files (1 for EMNIST letters), subtracted so labels start at 0.
    """

    stems: tuple[tuple[str, str], ...] = IDX_SPLITS
    split: str | None = None
    transpose: bool = False
    label_offset: int = 0

    _kind: ClassVar[str] = "idx files"
    # The plain file first: torchvision leaves both and it skips decompression.
    _suffixes: ClassVar[tuple[str, ...]] = ("", ".gz")

    def _stems(self) -> tuple[str, ...]:
        return tuple(stem for pair in self.stems for stem in pair)

    def _download_dir(self, root: Path) -> Path:
        return root / self.torchvision_class / "raw"

    def _download_options(self) -> dict[str, str]:
        return {} if self.split is None else {"split": self.split}

    def _decode(self, files: dict[str, Path]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        xs, ys = [], []
        for images_stem, labels_stem in self.stems:
            images = read_idx(files[images_stem], ndim=3)  # (n, H, W)
            labels = read_idx(files[labels_stem], ndim=1)  # (n,)
            if len(images) != len(labels):
                raise DataError(
                    f"{files[images_stem]} holds {len(images)} images but {files[labels_stem]} holds "
                    f"{len(labels)} labels; one of them is from another data set or truncated, replace both."
                )
            ys.append(self._labels(labels, files[labels_stem], offset=self.label_offset))
            if self.transpose:
                images = images.transpose(0, 2, 1)
            xs.append(images[:, None])  # (n, 1, H, W): one grey channel
        return np.concatenate(xs), np.concatenate(ys)


@dataclass(frozen=True)
class CifarSource(_FileSource):
    """CIFAR-10 or CIFAR-100 as torchvision stores it: pickled batches in one directory.

    Each batch is a pickled dict whose ``data`` is a uint8 array (n, 3072), each row
    the red, green and blue 32 x 32 planes one after the other, row-major, and
    whose ``label_key`` entry is a list of n labels (see :func:`read_cifar_batch`).

    Attributes
    ----------
    name, title, torchvision_class, num_classes, mean, std, local_fix:
        See :class:`_FileSource`.
    folder:
        The directory torchvision extracts the archive into, under the data root
        (``cifar-10-batches-py``).
    archive:
        The file torchvision downloads and extracts (``cifar-10-python.tar.gz``).
    train_files, test_files:
        The batch files of each split, in order.
    label_key:
        The key of the labels in each batch ("labels"; CIFAR-100: "fine_labels").
    """

    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str

    _kind: ClassVar[str] = "batch files"

    def _stems(self) -> tuple[str, ...]:
        return self.train_files + self.test_files

    def _download_dir(self, root: Path) -> Path:
        return root / self.folder

    def _decode(self, files: dict[str, Path]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        xs, ys = [], []
        for stem in self._stems():
            images, labels = read_cifar_batch(files[stem], self.label_key, archive=self.archive)
            xs.append(images)
            ys.append(self._labels(labels, files[stem]))
        return np.concatenate(xs), np.concatenate(ys)


def _find_files(
    directory: Path, stems: Sequence[str], suffixes: Sequence[str]
) -> tuple[dict[str, Path], list[str]]:
    """Map each stem to its file in ``directory`` (the first of ``stem + suffix`` that exists).

    Returns the files found and the stems with none, in the order of ``stems``.
    """
    files: dict[str, Path] = {}
    missing: list[str] = []
    for stem in stems:
        for suffix in suffixes:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                files[stem] = candidate
                break
        else:
            missing.append(stem)
    return files, missing


def _read_cached(
    name: str,
    files: dict[str, Path],
    root: Path,
    decode: Callable[[], tuple[NDArray[np.uint8], NDArray[np.int64]]],
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """``decode()`` through the ``.npy`` cache: map an entry for these files, or decode and make one.

    Parameters
    ----------
    name:
        Registry name of the data set; part of the entry name, so it must change
        whenever what ``decode`` makes of the same files does.
    files:
        The source files (stem -> path), which name the entry.
    root:
        The data root (see :func:`cache_dirs`).
    decode:
        Reads the images and labels from ``files``.

    Returns
    -------
    x, y:
        Read-only arrays, usually views of memory maps of the entry.
    """
    directories = cache_dirs(root)
    if not directories:
        return _read_only(*decode())
    entry = _entry_name(name, files)
    for directory in directories:
        cached = _read_entry(directory, entry)
        if cached is not None:
            return cached
    x, y = _read_only(*decode())
    for directory in directories:
        if _write_entry(directory, entry, x, y):
            # Map what was just written (it is in the page cache): the decoded copy is
            # freed and this process shares the pages with every later one.
            cached = _read_entry(directory, entry)
            if cached is not None:
                return cached
            break
    return x, y


def _read_only(x: NDArray[np.uint8], y: NDArray[np.int64]) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def cache_dirs(root: Path) -> list[Path]:
    """Directories of the ``.npy`` cache, in the order they are read and tried for writing.

    ``$FEDMEM_DATA_CACHE`` if set (``off``, ``0`` or empty: no cache), else
    ``<root>/fedmem-cache`` if the data root ``root`` is an existing writable
    directory, then ``$XDG_CACHE_HOME/fedmem`` (``~/.cache/fedmem`` if unset).
    A directory that cannot be created or written is skipped when writing.

    Parameters
    ----------
    root:
        The data root given to :func:`load_dataset`.

    Returns
    -------
    list of Path
        Possibly empty (caching off).
    """
    override = os.environ.get(CACHE_ENV)
    if override is not None:
        if override.strip().lower() in ("", "0", "off", "no", "false", "none"):
            return []
        return [Path(override).expanduser()]
    directories = []
    if root.is_dir() and os.access(root, os.W_OK):
        directories.append(root / CACHE_SUBDIR)
    xdg = os.environ.get("XDG_CACHE_HOME")
    with contextlib.suppress(RuntimeError):  # no home directory to be found: no user cache
        directories.append((Path(xdg) if xdg else Path.home() / ".cache") / "fedmem")
    return directories


def _entry_name(name: str, files: dict[str, Path]) -> str:
    """``<name>-<source directory digest>-<source files digest>``: changes whenever a source file does."""
    folder = hashlib.sha256()
    content = hashlib.sha256(f"fedmem npy cache {_CACHE_FORMAT} {name}".encode())
    for stem in sorted(files):
        path = files[stem].resolve()
        folder.update(f"{path.parent}\0".encode())
        st = path.stat()
        content.update(
            f"\0{stem}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}".encode()
        )
    return f"{name}-{folder.hexdigest()[:8]}-{content.hexdigest()[:16]}"


def _read_entry(directory: Path, entry: str) -> tuple[NDArray[np.uint8], NDArray[np.int64]] | None:
    """The cached images and labels of ``entry`` as read-only views of memory maps, or None."""
    try:
        x = np.load(directory / f"{entry}.x.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(directory / f"{entry}.y.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # missing, or damaged (not written by _write_entry)
        return None
    if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (len(x),):
        return None
    # Plain ndarray views (not np.memmap, whose slices stay memmaps); they keep the maps open.
    return np.asarray(x), np.asarray(y)


def _write_entry(directory: Path, entry: str, x: NDArray[np.uint8], y: NDArray[np.int64]) -> bool:
    """Write ``entry`` atomically (temporary file, then rename); False if ``directory`` is not writable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for suffix, array in ((".y.npy", y), (".x.npy", x)):
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{entry}{suffix}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
                os.replace(tmp, directory / f"{entry}{suffix}")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError:
        return False
    # Older entries of the same source directory are stale now; a process still mapping one
    # keeps its pages (and where unlinking a mapped file fails, the file just stays).
    prefix = entry.rsplit("-", 1)[0] + "-"
    for old in directory.glob(f"{prefix}*.npy"):
        if not old.name.startswith(f"{entry}."):
            with contextlib.suppress(OSError):
                old.unlink()
    return True


def read_idx(path: Path, *, ndim: int) -> NDArray[np.uint8]:
    """Read an idx file of unsigned bytes, plain or gzip-compressed.

    Parameters
    ----------
    path:
        The file; a ".gz" suffix means gzip-compressed.
    ndim:
        The number of dimensions the file must declare (3 for images, 1 for labels).

    Returns
    -------
    numpy.ndarray
        uint8 array with the shape declared in the header (read-only view of the bytes).

    Raises
    ------
    DataError
        Naming ``path`` if it cannot be decompressed, has a wrong magic number or
        dimension count, or holds a different number of bytes than its header declares.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    # BadGzipFile is an OSError; a truncated stream raises EOFError, a damaged one zlib.error.
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path} cannot be read ({exc}); delete it and reinstall or download it again."
        ) from exc

    def corrupt(problem: str) -> DataError:
        return DataError(
            f"{path} is not a valid idx file ({problem}); it is corrupt or truncated, "
            "delete it and reinstall or download it again."
        )

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise corrupt(f"{len(raw)} bytes, shorter than the {header_size}-byte header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise corrupt(
            f"magic number 0x{raw[:4].hex()}, "
            f"expected 0x0000{_IDX_UBYTE:02x}{ndim:02x} for {ndim}-d unsigned bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - header_size != expected:
        raise corrupt(f"header declares shape {shape} = {expected} bytes but {len(raw) - header_size} follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


# The globals a CIFAR batch may name: numpy's array and dtype reconstruction
# (Python 2 pickles name numpy.core, numpy 2 pickles numpy._core; protocol 5
# uses _frombuffer) and the bytes encoding of Python 3's protocol 2. Anything
# else is refused, so loading a planted file never runs code.
_CIFAR_PICKLE_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module.replace("numpy._core.", "numpy.core."), name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR batch holds")
        # numpy 2 renamed numpy.core to numpy._core (the old name warns); numpy 1.26 has only numpy.core.
        try:
            return super().find_class(module.replace("numpy.core.", "numpy._core."), name)
        except (ImportError, AttributeError):
            return super().find_class(module.replace("numpy._core.", "numpy.core."), name)


def read_cifar_batch(
    path: Path, label_key: str, *, archive: str
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Read one batch of CIFAR-10 or CIFAR-100 as torchvision extracts it.

    Parameters
    ----------
    path:
        The batch file: a pickled dict (Python 2 strings read as latin-1) whose
        ``data`` is a uint8 array (n, 3072) of red, green and blue 32 x 32
        planes, row-major.
    label_key:
        The key of the list of n labels ("labels"; CIFAR-100: "fine_labels").
    archive:
        The archive the file comes from, named in errors.

    Returns
    -------
    images, labels:
        uint8 (n, 3, 32, 32) and int64 (n,), not yet range-checked.

    Raises
    ------
    DataError
        Naming ``path`` if it cannot be read or unpickled, names a global other
        than numpy's array reconstruction, or is not such a dict.
    """

    def corrupt(problem: str) -> DataError:
        return DataError(
            f"{path} is not a valid CIFAR batch ({problem}); it is corrupt, truncated or from another "
            f"data set, delete it and extract {archive} again or download it again."
        )

    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc}); delete it and extract {archive} again.") from exc
    # A damaged pickle raises UnpicklingError, EOFError, ValueError, KeyError... depending on
    # where the damage is; each means the same thing here.
    except Exception as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise corrupt(detail) from exc
    if not isinstance(batch, dict):
        raise corrupt(f"a pickled {type(batch).__name__}, not a dict")
    for key in ("data", label_key):
        if key not in batch:
            raise corrupt(f"no {key!r} entry, only {', '.join(map(repr, batch))}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise corrupt(f"'data' is {shape}, not uint8 (n, 3072)")
    try:
        labels = np.asarray(batch[label_key])
    except ValueError as exc:
        raise corrupt(f"{label_key!r} is not a list of labels ({exc})") from exc
    if labels.shape != (len(data),) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise corrupt(f"{len(data)} images but {label_key!r} is {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


DATASETS: Registry[DatasetSource] = Registry("dataset", "data.dataset")
DATASETS.register(
    "fashion_mnist",
    IdxSource(
        name="fashion_mnist",
        title="Fashion-MNIST",
        torchvision_class="FashionMNIST",
        num_classes=10,
        # Train-split statistics of x / 255 (checked against the real files in the tests).
        mean=(0.2860,),
        std=(0.3530,),
        local_fix=(
            "install Debian's dataset-fashion-mnist package (sudo apt-get install dataset-fashion-mnist)"
        ),
    ),
)
DATASETS.register(
    "mnist",
    IdxSource(
        name="mnist",
        title="MNIST",
        torchvision_class="MNIST",
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        local_fix="copy the four MNIST idx files (plain or .gz) into {root}/MNIST/raw",
    ),
)

# CIFAR: train-split statistics of x / 255 as published (no copy of the files here to check them on).
_CIFAR_FILES = (
    "download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {{root}}"
)
DATASETS.register(
    "cifar10",
    CifarSource(
        name="cifar10",
        title="CIFAR-10",
        torchvision_class="CIFAR10",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        local_fix=_CIFAR_FILES.format(archive="cifar-10-python.tar.gz"),
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key="labels",
    ),
)
DATASETS.register(
    "cifar100",
    CifarSource(
        name="cifar100",
        title="CIFAR-100",
        torchvision_class="CIFAR100",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        local_fix=_CIFAR_FILES.format(archive="cifar-100-python.tar.gz"),
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        label_key="fine_labels",  # 100 classes; "coarse_labels" holds the 20 superclasses
    ),
)


def _emnist(split: str, num_classes: int, mean: float, std: float, *, label_offset: int = 0) -> IdxSource:
    """An EMNIST split: idx files named after the split, images stored transposed."""
    return IdxSource(
        name="emnist" if split == "byclass" else f"emnist_{split}",
        title=f"EMNIST ({split})",
        torchvision_class="EMNIST",
        num_classes=num_classes,
        mean=(mean,),
        std=(std,),
        local_fix=(
            f"copy the four emnist-{split} idx files (plain or .gz, from the gzip.zip of "
            "https://www.nist.gov/itl/products-and-services/emnist-dataset) into {root}/EMNIST/raw"
        ),
        stems=emnist_stems(split),
        split=split,
        transpose=True,
        label_offset=label_offset,
    )


# EMNIST's statistics are approximate: commonly quoted values, not checked here against the files
# (no copy offline). ByClass is LEAF's FEMNIST class set: 10 digits, 26 upper-, 26 lowercase letters.
DATASETS.register("emnist", _emnist("byclass", 62, 0.1736, 0.3317))
DATASETS.register("emnist_balanced", _emnist("balanced", 47, 0.1751, 0.3332))
# The letters files label a-z (upper and lowercase merged) 1 to 26.
DATASETS.register("emnist_letters", _emnist("letters", 26, 0.1751, 0.3332, label_offset=1))

# Text: a corpus shipped in the package (fedmem.data.text), one document per natural client.
DATASETS.register("stdlib_text", SnapshotSource("stdlib_text", STDLIB_ARCHIVE, STDLIB_SHA256))

# (registry name, resolved root) -> data; lives as long as the process, so a
# Ray actor reads the files once however many clients it runs.
_CACHE: dict[tuple[str, Path], ImageData | TextCorpus] = {}


def load_dataset(name: str, root: str | Path, *, download: bool = True) -> ImageData | TextCorpus:
    """Load a registered data set, train split followed by test split, cached per process.

    Parameters
    ----------
    name:
        Registry name ("fashion_mnist", "mnist", "cifar10", "cifar100", "emnist", ...).
    root:
        Data root: searched first, and where a download goes.
    download:
        Whether to download with torchvision when no local copy is found.

    Returns
    -------
    ImageData or TextCorpus
        The same object for every call with the same name and root in this process.

    Raises
    ------
    ConfigError
        If ``name`` is not registered (the message lists the valid names).
    DataError
        If the data cannot be found, downloaded or parsed.
    """
    source = DATASETS.get(name)
    resolved = Path(root).expanduser().resolve()
    key = (name, resolved)
    if key not in _CACHE:
        _CACHE[key] = source.load(resolved, download=download)
    return _CACHE[key]


def to_tensor(x: NDArray[np.uint8], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise uint8 images to a float32 tensor: ``(x / 255 - mean) / std`` per channel.

    Parameters
    ----------
    x:
        Images, shape (n, C, H, W), uint8.
    mean, std:
        One value per channel.

    Returns
    -------
    torch.Tensor
        float32, shape (n, C, H, W), a new tensor (``x`` may be read-only).
    """
    if x.ndim != 4 or len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(
            f"to_tensor expects (n, C, H, W) images and C means and stds, got shape {x.shape}, "
            f"{len(mean)} means and {len(std)} stds"
        )
    out = torch.tensor(x, dtype=torch.float32).div_(255.0)  # copies, so in-place ops below are safe
    channel_mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    channel_std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return out.sub_(channel_mean).div_(channel_std)


def load_images(name: str, root: str | Path, *, download: bool = True) -> ImageData:
    """:func:`load_dataset` for callers that need images; a text corpus is a :class:`DataError`."""
    data = load_dataset(name, root, download=download)
    if not isinstance(data, ImageData):
        raise DataError(f"data set {name!r} is text, not images; this needs an image data set.")
    return data
