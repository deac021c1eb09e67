"""The .npy cache of decoded data sets: identical arrays, invalidation, locations, fallbacks."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fedmem.data import datasets
from fedmem.data.datasets import CACHE_ENV, CACHE_SUBDIR, DATASETS, ImageData, cache_dirs, load_images
from fedmem.errors import DataError
from tests.data.test_datasets import SYSTEM_FASHION_MNIST, write_idx, write_split_files


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A fresh per-process cache, and no test writes into the real ~/.cache.
    monkeypatch.setattr(datasets, "_CACHE", {})
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def load_fresh(root: Path) -> ImageData:
    """load_images as a new process would run it (nothing cached in memory)."""
    datasets._CACHE.clear()
    return load_images("fashion_mnist", root, download=False)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any idx decoding fail, so a successful load must come from the cache."""

    def fail(path: Path, *, ndim: int) -> np.ndarray:
        raise AssertionError(f"{path} was decoded although a cache entry exists")

    monkeypatch.setattr(datasets, "read_idx", fail)


def assert_same(cached: ImageData, decoded: ImageData) -> None:
    for a, b in ((cached.x, decoded.x), (cached.y, decoded.y)):
        assert type(a) is np.ndarray  # not np.memmap: its slices would be memmaps too
        assert a.dtype == b.dtype
        assert a.shape == b.shape
        assert a.tobytes() == b.tobytes()
        assert not a.flags.writeable
    assert (cached.name, cached.num_classes, cached.mean, cached.std) == (
        decoded.name,
        decoded.num_classes,
        decoded.mean,
        decoded.std,
    )


@pytest.mark.parametrize("gz", [False, True])
def test_cached_arrays_are_identical_to_decoded_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gz: bool
) -> None:
    root = tmp_path / "root"
    write_split_files(root / "FashionMNIST" / "raw", gz=gz)
    monkeypatch.setenv(CACHE_ENV, "off")
    decoded = load_fresh(root)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))

    first = load_fresh(root)  # decodes and writes the entry
    no_decoding(monkeypatch)
    second = load_fresh(root)  # maps the entry

    assert len(entries(tmp_path / "cache")) == 2  # images and labels
    assert_same(first, decoded)
    assert_same(second, decoded)


@pytest.mark.skipif(
    not SYSTEM_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_from_the_cache_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    decoded = load_fresh(tmp_path / "empty-root")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    load_fresh(tmp_path / "empty-root")
    no_decoding(monkeypatch)

    assert_same(load_fresh(tmp_path / "empty-root"), decoded)


def test_a_changed_source_file_is_never_served_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    raw = tmp_path / "FashionMNIST" / "raw"
    write_split_files(raw, labels_offset=0)
    assert load_fresh(tmp_path).y.tolist() == [0, 1, 2, 3, 4]
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    before = labels.stat()
    # Same size, same modification time: only the content (and the change time, inode) differ.
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([8, 9]), gz=True)
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))

    assert load_fresh(tmp_path).y.tolist() == [0, 1, 2, 8, 9]
    # The stale entry of that source directory is gone; only the new one is left.
    assert len(entries(tmp_path / "cache")) == 2


def test_entries_of_different_sources_do_not_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_split_files(tmp_path / "a" / "FashionMNIST" / "raw", labels_offset=0)
    write_split_files(tmp_path / "b" / "FashionMNIST" / "raw", labels_offset=1)

    assert int(load_fresh(tmp_path / "a").y[0]) == 0
    assert int(load_fresh(tmp_path / "b").y[0]) == 1
    no_decoding(monkeypatch)
    assert int(load_fresh(tmp_path / "a").y[0]) == 0
    assert len(entries(tmp_path / "cache")) == 4


def test_unwritable_cache_location_falls_back_to_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    write_split_files(root / "FashionMNIST" / "raw")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # Under a regular file nothing can be created, whoever runs the test (root included).
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))

    data = load_fresh(root)

    np.testing.assert_array_equal(data.y, [0, 1, 2, 3, 4])
    assert blocker.read_text() == "not a directory"


def test_falls_back_to_the_user_cache_then_to_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "system"
    write_split_files(system)
    monkeypatch.setitem(datasets.SEARCH_PATHS, "fashion_mnist", (str(system),))
    missing_root = tmp_path / "no-such-root"  # not created just to hold a cache

    load_fresh(missing_root)
    assert not missing_root.exists()
    assert len(entries(tmp_path / "xdg" / "fedmem")) == 2

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    np.testing.assert_array_equal(load_fresh(missing_root).y, [0, 1, 2, 3, 4])


def test_cache_goes_under_a_writable_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    write_split_files(root / "FashionMNIST" / "raw")

    load_fresh(root)

    assert len(entries(root / CACHE_SUBDIR)) == 2
    assert entries(tmp_path / "xdg") == []


def test_cache_dirs_order_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert cache_dirs(root) == [root / CACHE_SUBDIR, tmp_path / "xdg" / "fedmem"]
    assert cache_dirs(tmp_path / "missing") == [tmp_path / "xdg" / "fedmem"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dirs(tmp_path / "missing") == [Path.home() / ".cache" / "fedmem"]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dirs(root) == [tmp_path / "mine"]
    for off in ("off", "0", ""):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_dirs(root) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-dtype"])
def test_a_damaged_entry_is_decoded_again_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_split_files(tmp_path / "FashionMNIST" / "raw")
    good = load_fresh(tmp_path)
    (images,) = (tmp_path / "cache").glob("*.x.npy")
    content = images.read_bytes()
    # A new file, not the mapped one changed in place (that would change `good` too: the
    # cache never writes in place, and nobody else should).
    images.unlink()
    if damage == "truncate":
        images.write_bytes(content[:-7])
    elif damage == "garbage":
        images.write_bytes(b"\x00" * 200)
    else:
        np.save(images, np.zeros((5, 1, 2, 3), dtype=np.float32))

    again = load_fresh(tmp_path)

    assert_same(again, good)
    no_decoding(monkeypatch)
    assert_same(load_fresh(tmp_path), good)  # and the entry was rewritten whole


def test_concurrent_first_loads_agree_and_leave_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_split_files(tmp_path / "FashionMNIST" / "raw")
    source = DATASETS.get("fashion_mnist")

    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda _: source.load(tmp_path, download=False), range(16)))

    for data in loaded:
        assert isinstance(data, ImageData)
        np.testing.assert_array_equal(data.y, [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(data.x, loaded[0].x)  # type: ignore[union-attr]
    assert len(entries(tmp_path / "cache")) == 2  # no *.tmp left behind


def test_corrupt_source_still_fails_with_the_cache_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    raw = tmp_path / "FashionMNIST" / "raw"
    write_split_files(raw, gz=False)
    bad = raw / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])

    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_fresh(tmp_path)
    assert entries(tmp_path / "cache") == []
