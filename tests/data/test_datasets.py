"""Data set loading: idx parsing, the search order, download fallback, real Fashion-MNIST, to_tensor."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmem.data import datasets
from fedmem.data.datasets import DATASETS, ImageData, load_dataset, load_images, read_idx, to_tensor
from fedmem.errors import ConfigError, DataError

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    """Write ``array`` (uint8) as an idx file, gzip-compressed under ``path.gz`` if ``gz``."""
    array = np.asarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_split_files(directory: Path, *, labels_offset: int = 0, gz: bool = True) -> tuple[np.ndarray, ...]:
    """Write a 3-image train split and a 2-image test split (2x3 pixels) into ``directory``.

    ``labels_offset`` makes the labels tell which directory they were read from.
    """
    train_x = np.arange(3 * 2 * 3, dtype=np.uint8).reshape(3, 2, 3)
    train_y = np.array([0, 1, 2]) + labels_offset
    test_x = 200 + np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    test_y = np.array([3, 4]) + labels_offset
    write_idx(directory / "train-images-idx3-ubyte", train_x, gz=gz)
    write_idx(directory / "train-labels-idx1-ubyte", train_y, gz=gz)
    write_idx(directory / "t10k-images-idx3-ubyte", test_x, gz=gz)
    write_idx(directory / "t10k-labels-idx1-ubyte", test_y, gz=gz)
    return train_x, train_y, test_x, test_y


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test sees a fresh per-process cache; the real one is restored afterwards.
    monkeypatch.setattr(datasets, "_CACHE", {})


@pytest.fixture
def system_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /usr/share/datasets/fashion-mnist, last in the search order."""
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setitem(
        datasets.SEARCH_PATHS,
        "fashion_mnist",
        ("{root}/FashionMNIST/raw", "{root}/fashion-mnist", str(system)),
    )
    return system


class FailingDownload:
    """Stands in for torchvision.datasets.FashionMNIST on a machine without internet."""

    calls = 0

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls += 1
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried mirrors, network unreachable"
        )


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_gives_exact_values_and_shape(tmp_path: Path, gz: bool) -> None:
    images = np.array([[[0, 1, 2], [3, 4, 255]], [[9, 8, 7], [6, 5, 128]]], dtype=np.uint8)
    labels = np.array([7, 0], dtype=np.uint8)
    images_path = write_idx(tmp_path / "images", images, gz=gz)
    labels_path = write_idx(tmp_path / "labels", labels, gz=gz)

    read_images = read_idx(images_path, ndim=3)
    read_labels = read_idx(labels_path, ndim=1)

    assert read_images.dtype == np.uint8
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, [7, 0])


@pytest.mark.parametrize("gz", [False, True])
def test_load_dataset_concatenates_train_then_test(tmp_path: Path, system_dir: Path, gz: bool) -> None:
    train_x, train_y, test_x, test_y = write_split_files(tmp_path / "root" / "FashionMNIST" / "raw", gz=gz)

    data = load_images("fashion_mnist", tmp_path / "root", download=False)

    assert isinstance(data, ImageData)
    assert data.name == "fashion_mnist"
    assert data.num_classes == 10
    assert data.x.shape == (5, 1, 2, 3)
    assert data.x.dtype == np.uint8
    assert data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x[:, 0], np.concatenate([train_x, test_x]))
    np.testing.assert_array_equal(data.y, np.concatenate([train_y, test_y]))
    assert data.mean == (0.2860,)
    assert data.std == (0.3530,)
    # Shared through the cache, so nobody may write into it.
    assert not data.x.flags.writeable
    assert not data.y.flags.writeable


def test_plain_file_is_preferred_to_gz(tmp_path: Path, system_dir: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_split_files(raw, labels_offset=0, gz=True)
    write_split_files(raw, labels_offset=5, gz=False)

    data = load_images("fashion_mnist", tmp_path, download=False)

    np.testing.assert_array_equal(data.y, [5, 6, 7, 8, 9])


def test_mnist_reads_its_own_directory(tmp_path: Path) -> None:
    write_split_files(tmp_path / "MNIST" / "raw", labels_offset=2)

    data = load_images("mnist", tmp_path, download=False)

    assert data.name == "mnist"
    np.testing.assert_array_equal(data.y, [2, 3, 4, 5, 6])
    assert data.mean == (0.1307,)
    assert data.std == (0.3081,)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2]), "2 follow"),  # truncated data
        (bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([1, 2, 3]), "3 follow"),  # trailing bytes
        (bytes([8, 3, 0, 0]) + (2).to_bytes(4, "big") + bytes([1, 2]), "magic number 0x08030000"),
        (bytes([0, 0, 0x0D, 1]) + (2).to_bytes(4, "big") + bytes(8), "magic number 0x00000d01"),  # float32
        (bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big"), "expected 0x00000801"),  # images where labels belong
        (bytes([0, 0, 8]), "shorter than the 8-byte header"),
    ],
)
def test_corrupt_idx_raises_data_error_naming_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(content)

    with pytest.raises(DataError, match="not a valid idx file") as info:
        read_idx(path, ndim=1)

    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_truncated_gz_raises_data_error_naming_the_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(100), gz=True)
    path.write_bytes(path.read_bytes()[:20])

    with pytest.raises(DataError) as info:
        read_idx(path, ndim=1)

    assert str(path) in str(info.value)


def test_corrupt_file_in_search_directory_fails_loading(tmp_path: Path, system_dir: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_split_files(raw, gz=False)
    bad = raw / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])

    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion_mnist", tmp_path, download=False)


def test_mismatched_image_and_label_counts_fail(tmp_path: Path, system_dir: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_split_files(raw, gz=False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([1, 2, 3]), gz=False)

    with pytest.raises(DataError, match=r"2 images but .* 3 labels"):
        load_dataset("fashion_mnist", tmp_path, download=False)


def test_search_order_root_before_system(tmp_path: Path, system_dir: Path) -> None:
    root = tmp_path / "root"
    write_split_files(system_dir, labels_offset=0)
    write_split_files(root / "fashion-mnist", labels_offset=1)
    write_split_files(root / "FashionMNIST" / "raw", labels_offset=2)

    def first_label() -> int:
        datasets._CACHE.clear()
        return int(load_images("fashion_mnist", root, download=False).y[0])

    found = [first_label()]
    # A directory missing one of the four files is skipped, not half-read.
    (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    found.append(first_label())
    shutil.rmtree(root / "fashion-mnist")
    found.append(first_label())

    assert found == [2, 1, 0]


def test_default_search_order() -> None:
    assert datasets.SEARCH_PATHS["fashion_mnist"] == (
        "{root}/FashionMNIST/raw",
        "{root}/fashion-mnist",
        "/usr/share/datasets/fashion-mnist",
    )
    assert datasets.SEARCH_PATHS["mnist"] == ("{root}/MNIST/raw", "{root}/mnist")


def test_missing_everywhere_with_failing_download_names_the_package(
    tmp_path: Path, system_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FailingDownload)
    FailingDownload.calls = 0
    root = tmp_path / "root"

    with pytest.raises(DataError) as info:
        load_dataset("fashion_mnist", root, download=True)

    message = str(info.value)
    assert FailingDownload.calls == 1
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "network unreachable" in message
    for searched in (root / "FashionMNIST" / "raw", root / "fashion-mnist", system_dir):
        assert str(searched) in message
    assert "\n" not in message
    assert message.endswith(".")


def test_missing_with_download_off_does_not_download(
    tmp_path: Path, system_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FailingDownload)
    FailingDownload.calls = 0

    with pytest.raises(DataError, match="dataset-fashion-mnist") as info:
        load_dataset("fashion_mnist", tmp_path, download=False)

    assert FailingDownload.calls == 0
    assert "downloading is off" in str(info.value)


def test_successful_download_is_read_from_torchvisions_raw_folder(
    tmp_path: Path, system_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    calls: list[tuple[str, bool]] = []

    class FakeDownload:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            write_split_files(Path(root) / "FashionMNIST" / "raw", labels_offset=3)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownload)

    data = load_images("fashion_mnist", tmp_path / "root")

    assert calls == [(str(tmp_path / "root"), True)]
    np.testing.assert_array_equal(data.y, [3, 4, 5, 6, 7])


def test_download_that_leaves_nothing_is_an_error(
    tmp_path: Path, system_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    class SilentDownload:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            pass

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", SilentDownload)

    with pytest.raises(DataError, match="left no idx files"):
        load_dataset("fashion_mnist", tmp_path)


def test_load_is_cached_per_name_and_resolved_root(tmp_path: Path, system_dir: Path) -> None:
    write_split_files(tmp_path / "a" / "FashionMNIST" / "raw", labels_offset=0)
    write_split_files(tmp_path / "b" / "FashionMNIST" / "raw", labels_offset=1)

    first = load_dataset("fashion_mnist", tmp_path / "a", download=False)
    again = load_dataset("fashion_mnist", str(tmp_path / "b" / ".." / "a"), download=False)
    other = load_images("fashion_mnist", tmp_path / "b", download=False)

    assert again is first
    assert other is not first
    assert int(other.y[0]) == 1


def test_unknown_dataset_is_a_config_error_listing_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"data\.dataset = 'imagenet'.*valid choices: .*fashion_mnist, mnist"
    ):
        load_dataset("imagenet", tmp_path)
    assert {"fashion_mnist", "mnist", "stdlib_text"} <= set(DATASETS.names())


@pytest.mark.skipif(
    not SYSTEM_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist(tmp_path: Path) -> None:
    data = load_images("fashion_mnist", tmp_path / "empty-root", download=False)

    assert data.x.shape == (70000, 1, 28, 28)
    assert data.x.dtype == np.uint8
    assert data.y.shape == (70000,)
    np.testing.assert_array_equal(np.bincount(data.y), [7000] * 10)
    # The first train and first test image are both ankle boots (class 9).
    assert data.y[0] == 9
    assert data.y[60000] == 9
    # The normalisation constants are the train split's statistics.
    train = data.x[:60000].astype(np.float32) / 255
    assert train.mean() == pytest.approx(data.mean[0], abs=5e-4)
    assert train.std() == pytest.approx(data.std[0], abs=5e-4)


def test_to_tensor_exact_values() -> None:
    x = np.array([[[[0, 255], [51, 102]]]], dtype=np.uint8)  # (1, 1, 2, 2)

    out = to_tensor(x, (0.5,), (0.5,))

    assert out.dtype == torch.float32
    assert out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 1.0], [-0.6, -0.2]]]]))


def test_to_tensor_normalises_each_channel_with_its_own_statistics() -> None:
    x = np.array([[[[0, 255]], [[51, 102]]]], dtype=np.uint8)  # (1, 2, 1, 2)
    x.setflags(write=False)  # as handed out by load_dataset

    out = to_tensor(x, (0.0, 0.2), (1.0, 0.1))

    torch.testing.assert_close(out, torch.tensor([[[[0.0, 1.0]], [[0.0, 2.0]]]]))


def test_to_tensor_rejects_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="2 means"):
        to_tensor(np.zeros((1, 1, 2, 2), dtype=np.uint8), (0.5, 0.5), (0.5, 0.5))
