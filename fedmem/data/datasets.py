"""Image data sets held in memory as uint8 arrays, read from local copies first.

A data set is loaded once per process (a Ray actor keeps it for its lifetime)
as the train split followed by the test split; the engine re-splits it per
client (see :mod:`fedmem.data.partition`), so the original split boundary
plays no role.

MNIST and Fashion-MNIST share the idx file format of LeCun et al.: a 4-byte
magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the raw values. We parse it with numpy
rather than through torchvision so that a system copy (Debian's
``dataset-fashion-mnist`` package ships the four ``.gz`` files) is usable
without copying it under the data root, and so that a corrupt file gives an
error naming it instead of a reshape failure deep inside torchvision.

Lookup order for a data set (:data:`SEARCH_PATHS`): directories under the
data root, then system directories, then, if ``download`` is on, torchvision's
downloader writing into ``<root>/<TorchvisionClass>/raw``.

Decoded arrays are cached as ``.npy`` files (:func:`cache_dirs` says where), which
later processes map read-only (``np.load(..., mmap_mode="r")``) instead of
decompressing and parsing the idx files again: Fashion-MNIST loads in 10 ms
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
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from fedmem.data.text import STDLIB_ARCHIVE, STDLIB_SHA256, SnapshotSource, TextCorpus
from fedmem.errors import DataError
from fedmem.registry import Registry

# Where each data set's four idx files are looked for, in order; "{root}" is the
# data root given to load_dataset. A module constant so tests (and users with an
# unusual layout) can change it.
SEARCH_PATHS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": (
        "{root}/FashionMNIST/raw",
        "{root}/fashion-mnist",
        "/usr/share/datasets/fashion-mnist",
    ),
    "mnist": ("{root}/MNIST/raw", "{root}/mnist"),
}

# (images, labels) file stems of the two splits, train first; each file may be
# stored plain or gzip-compressed with a ".gz" suffix.
IDX_SPLITS: tuple[tuple[str, str], ...] = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
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
class IdxSource:
    """An MNIST-format data set stored as four idx files.

    Attributes
    ----------
    name:
        Registry name, also the key into :data:`SEARCH_PATHS`.
    title:
        Name used in messages ("Fashion-MNIST").
    torchvision_class:
        Name of the ``torchvision.datasets`` class that downloads it; it writes
        the files into ``<root>/<torchvision_class>/raw``.
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

    def load(self, root: Path, *, download: bool) -> ImageData:
        """Read the files from the first search directory holding all four, else download them.

        Raises
        ------
        DataError
            If no directory holds the files and downloading is off or fails, or
            if a file is corrupt.
        """
        searched = [Path(template.replace("{root}", str(root))) for template in SEARCH_PATHS[self.name]]
        for directory in searched:
            files = _find_idx_files(directory)
            if files is not None:
                return self._read_cached(files, root)

        raw_dir = root / self.torchvision_class / "raw"
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
                files = _find_idx_files(raw_dir)
                if files is not None:
                    return self._read_cached(files, root)
                reason = f"the torchvision download left no idx files in {raw_dir}"
        online = "run with internet access" if download else "enable downloading and run with internet access"
        raise DataError(
            f"{self.title} was not found in {', '.join(map(str, searched))} and {reason}; "
            f"{self.local_fix.replace('{root}', str(root))} or {online} "
            f"so torchvision can download it into {root}."
        )

    def _download(self, root: Path) -> None:
        # Imported here: torchvision costs ~1 s to import and is only needed
        # on a machine without a local copy.
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.torchvision_class)
        dataset_class(str(root), train=True, download=True)

    def _read_cached(self, files: dict[str, Path], root: Path) -> ImageData:
        """Like :meth:`_read`, through the ``.npy`` cache: map an entry for these files, or make one."""
        directories = cache_dirs(root)
        if not directories:
            return self._read(files)
        entry = _entry_name(self.name, files)
        for directory in directories:
            cached = _read_entry(directory, entry)
            if cached is not None:
                return ImageData(self.name, *cached, self.num_classes, self.mean, self.std)
        data = self._read(files)
        for directory in directories:
            if _write_entry(directory, entry, data.x, data.y):
                # Map what was just written (it is in the page cache): the decoded copy is
                # freed and this process shares the pages with every later one.
                cached = _read_entry(directory, entry)
                if cached is not None:
                    return ImageData(self.name, *cached, self.num_classes, self.mean, self.std)
                break
        return data

    def _read(self, files: dict[str, Path]) -> ImageData:
        """Decode the four idx files (no cache)."""
        xs, ys = [], []
        for images_stem, labels_stem in IDX_SPLITS:
            images = read_idx(files[images_stem], ndim=3)  # (n, H, W)
            labels = read_idx(files[labels_stem], ndim=1)  # (n,)
            if len(images) != len(labels):
                raise DataError(
                    f"{files[images_stem]} holds {len(images)} images but {files[labels_stem]} holds "
                    f"{len(labels)} labels; one of them is from another data set or truncated, replace both."
                )
            if labels.size and int(labels.max()) >= self.num_classes:
                raise DataError(
                    f"{files[labels_stem]} has label {int(labels.max())} but {self.title} has "
                    f"{self.num_classes} classes; the file is from another data set, replace it."
                )
            xs.append(images[:, None])  # (n, 1, H, W): one grey channel
            ys.append(labels.astype(np.int64))
        x = np.concatenate(xs)
        y = np.concatenate(ys)
        x.setflags(write=False)
        y.setflags(write=False)
        return ImageData(self.name, x, y, self.num_classes, self.mean, self.std)


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Map each idx file stem to its path in ``directory``, or None if any is missing."""
    files: dict[str, Path] = {}
    for stem in (stem for split in IDX_SPLITS for stem in split):
        # The plain file first: torchvision leaves both and it skips decompression.
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                files[stem] = candidate
                break
        else:
            return None
    return files


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
        Registry name ("fashion_mnist", "mnist").
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
