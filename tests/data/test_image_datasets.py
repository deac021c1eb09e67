"""CIFAR-10, CIFAR-100 and EMNIST: tiny files in torchvision's on-disk formats, read back exactly."""

from __future__ import annotations

import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmem.data import datasets
from fedmem.data.datasets import CACHE_ENV, DATASETS, load_dataset, load_images
from fedmem.errors import DataError
from tests.data.test_datasets import write_idx

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A fresh per-process cache, and no test writes into the real ~/.cache.
    monkeypatch.setattr(datasets, "_CACHE", {})
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, Any]]]:
    """Replace torchvision's downloaders with fakes that record their calls and fail."""
    import torchvision.datasets

    calls: list[tuple[str, str, dict[str, Any]]] = []
    for name in ("CIFAR10", "CIFAR100", "EMNIST"):

        def fail(root: str, *, _name: str = name, **kwargs: Any) -> None:
            calls.append((_name, root, kwargs))
            raise RuntimeError("network unreachable")

        monkeypatch.setattr(torchvision.datasets, name, fail)
    return calls


# --- writing the formats -----------------------------------------------------------------------


def _string(raw: bytes) -> bytes:
    """A Python 2 ``str`` pickle opcode: SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw


def _py2_value(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        assert value.dtype == np.uint8
        shape = b"".join(b"J" + struct.pack("<i", d) for d in value.shape)
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _string(b"b") + b"\x87R"
            b"(K\x01(" + shape + b"t"  # state: version, shape,
            b"cnumpy\ndtype\n" + _string(b"u1") + b"K\x00K\x01\x87R"  # dtype,
            b"(K\x03" + _string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            b"\x89" + _string(value.tobytes()) + b"tb"  # Fortran order, raw bytes as a str
        )
    if isinstance(value, list):
        return b"](" + b"".join(b"J" + struct.pack("<i", v) for v in value) + b"e"
    assert isinstance(value, str)
    return _string(value.encode("latin1"))


def py2_pickle(batch: dict[str, Any]) -> bytes:
    """``batch`` pickled as Python 2's cPickle wrote CIFAR's files: protocol 2, bytes as ``str``
    (read back with ``encoding="latin1"``), arrays through ``numpy.core.multiarray``."""
    items = b"".join(_string(key.encode()) + _py2_value(value) for key, value in batch.items())
    return b"\x80\x02}(" + items + b"u."


def write_batch(path: Path, batch: dict[str, Any], protocol: int | str = "python2") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        py2_pickle(batch) if protocol == "python2" else pickle.dumps(batch, protocol=int(protocol))
    )
    return path


def rgb_row(r: int, g: int, b: int) -> np.ndarray:
    """One CIFAR row (3072 bytes) whose red plane is all ``r``, green all ``g``, blue all ``b``."""
    return np.repeat(np.array([r, g, b], dtype=np.uint8), 1024)


def pattern_row() -> np.ndarray:
    """A row whose byte at (channel c, row h, column w) is ``(c * 1024 + h * 32 + w) % 251``."""
    return (np.arange(3072) % 251).astype(np.uint8)


def write_cifar10(directory: Path, protocol: int | str = "python2") -> tuple[np.ndarray, list[int]]:
    """Two rows per batch; train batch k holds colours (k, k + 10, k + 20) and (k + 100, ...);
    the test batch holds an RGB (1, 2, 3) row and a pattern row. Returns the rows and labels."""
    rows, labels = [], []
    for k, name in enumerate(CIFAR10_TRAIN, start=1):
        data = np.stack([rgb_row(k, k + 10, k + 20), rgb_row(k + 100, k + 110, k + 120)])
        batch_labels = [k - 1, 9 - k]
        write_batch(
            directory / name,
            {"batch_label": f"training batch {k} of 5", "data": data, "labels": batch_labels},
            protocol,
        )
        rows.append(data)
        labels += batch_labels
    test = np.stack([rgb_row(1, 2, 3), pattern_row()])
    write_batch(directory / "test_batch", {"data": test, "labels": [7, 0]}, protocol)
    return np.concatenate([*rows, test]), [*labels, 7, 0]


def write_cifar100(directory: Path) -> None:
    write_batch(
        directory / "train",
        {
            "data": np.stack([rgb_row(5, 6, 7), rgb_row(8, 9, 10)]),
            "fine_labels": [99, 42],
            "coarse_labels": [19, 3],
        },
    )
    write_batch(
        directory / "test", {"data": np.stack([rgb_row(1, 2, 3)]), "fine_labels": [0], "coarse_labels": [0]}
    )


# EMNIST: a 2 x 3 image as stored (transposed), whose upright version is its transpose.
STORED = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)


def write_emnist(
    directory: Path, split: str, train_labels: list[int], test_labels: list[int], *, gz: bool = True
) -> None:
    """Image i of the train split is ``STORED + 10 * i``, of the test split ``STORED + 100 + 10 * i``."""
    for part, labels, base in (("train", train_labels, 0), ("test", test_labels, 100)):
        images = np.stack([STORED + base + 10 * i for i in range(len(labels))])
        write_idx(directory / f"emnist-{split}-{part}-images-idx3-ubyte", images, gz=gz)
        write_idx(directory / f"emnist-{split}-{part}-labels-idx1-ubyte", np.array(labels), gz=gz)


def fail_to_decode(monkeypatch: pytest.MonkeyPatch, *functions: str) -> None:
    """Make the named decoders fail, so a successful load must come from the .npy cache."""

    def fail(path: Path, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{path} was decoded although a cache entry exists")

    for function in functions:
        monkeypatch.setattr(datasets, function, fail)


def fresh(load: Callable[[], Any]) -> Any:
    """``load()`` as a new process would run it (nothing cached in memory)."""
    datasets._CACHE.clear()
    return load()


# --- CIFAR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["python2", 2, 4, 5])
def test_cifar10_exact_pixels_channel_layout_and_order(tmp_path: Path, protocol: int | str) -> None:
    rows, labels = write_cifar10(tmp_path / "cifar-10-batches-py", protocol)

    data = load_images("cifar10", tmp_path, download=False)

    assert data.name == "cifar10"
    assert data.num_classes == 10
    assert data.x.shape == (12, 3, 32, 32)
    assert data.x.dtype == np.uint8
    assert data.y.dtype == np.int64
    # Train batches 1..5 in order, then the test batch.
    assert data.y.tolist() == labels
    for k in range(1, 6):
        first = data.x[2 * (k - 1)]
        assert (first[0] == k).all() and (first[1] == k + 10).all() and (first[2] == k + 20).all()
    rgb = data.x[10]
    assert (rgb[0] == 1).all() and (rgb[1] == 2).all() and (rgb[2] == 3).all()
    c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    np.testing.assert_array_equal(data.x[11], (c * 1024 + h * 32 + w) % 251)
    np.testing.assert_array_equal(data.x.reshape(12, 3072), rows)
    assert data.mean == (0.4914, 0.4822, 0.4465)
    assert data.std == (0.2470, 0.2435, 0.2616)
    assert not data.x.flags.writeable
    assert not data.y.flags.writeable


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar-100-python")

    data = load_images("cifar100", tmp_path, download=False)

    assert data.num_classes == 100
    assert data.x.shape == (3, 3, 32, 32)
    assert data.y.tolist() == [99, 42, 0]
    assert [int(data.x[i, c, 0, 0]) for i in range(3) for c in range(3)] == [5, 6, 7, 8, 9, 10, 1, 2, 3]
    assert data.mean == (0.5071, 0.4865, 0.4409)
    assert data.std == (0.2673, 0.2564, 0.2762)


def test_cifar_search_order_and_lowercase_directory(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar100")
    assert load_images("cifar100", tmp_path, download=False).y.tolist() == [99, 42, 0]

    write_batch(
        tmp_path / "cifar-100-python" / "train", {"data": np.stack([rgb_row(0, 0, 0)]), "fine_labels": [5]}
    )
    write_batch(
        tmp_path / "cifar-100-python" / "test", {"data": np.stack([rgb_row(0, 0, 0)]), "fine_labels": [6]}
    )
    # torchvision's directory comes first.
    assert fresh(lambda: load_images("cifar100", tmp_path, download=False)).y.tolist() == [5, 6]
    assert datasets.SEARCH_PATHS["cifar10"] == ("{root}/cifar-10-batches-py", "{root}/cifar10")
    assert datasets.SEARCH_PATHS["cifar100"] == ("{root}/cifar-100-python", "{root}/cifar100")


def test_cifar_label_out_of_range_names_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    bad = write_batch(directory / "data_batch_4", {"data": np.stack([rgb_row(0, 0, 0)]), "labels": [10]})

    with pytest.raises(DataError, match="has label 10 but CIFAR-10 has 10 classes") as info:
        load_dataset("cifar10", tmp_path, download=False)

    assert str(bad) in str(info.value)
    assert "replace it" in str(info.value)


def test_cifar_missing_batch_file_is_named_in_the_not_found_error(
    tmp_path: Path, no_network: list[tuple[str, str, dict[str, Any]]]
) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    (directory / "data_batch_3").unlink()

    with pytest.raises(DataError, match=r"^CIFAR-10 was not found in .*downloading is off") as info:
        load_dataset("cifar10", tmp_path, download=False)

    message = str(info.value)
    assert f"{directory} (which lacks data_batch_3), {tmp_path / 'cifar10'} and downloading is off" in message
    assert f"extract it into {tmp_path}" in message
    assert no_network == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "Ran out of input"),
        (b"\x80\x02}q\x00(U\x04dataq", "not a valid CIFAR batch"),  # truncated
        (b"garbage, not a pickle at all", "not a valid CIFAR batch"),
        (pickle.dumps([1, 2, 3]), "a pickled list, not a dict"),
        (pickle.dumps({"labels": [1]}), "no 'data' entry, only 'labels'"),
        (
            pickle.dumps({"data": np.zeros((2, 3071), np.uint8), "labels": [1, 2]}),
            "(2, 3071), not uint8 (n, 3072)",
        ),
        (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [1, 2]}), "'data' is float32"),
        (
            pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}),
            "2 images but 'labels' is int64 (1,)",
        ),
        (pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": ["cat"]}), "'labels' is <U3 (1,)"),
    ],
)
def test_corrupt_batch_raises_data_error_naming_the_file(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    bad = directory / "test_batch"
    bad.write_bytes(content)

    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path, download=False)

    message = str(info.value)
    assert message.startswith(f"{bad} is not a valid CIFAR batch (")
    assert problem in message
    assert "extract cifar-10-python.tar.gz again" in message
    assert "\n" not in message


class _Planted:
    """Unpickles by calling ``pathlib.Path.touch``: a stand-in for a file that runs code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.target,))


def test_a_batch_naming_other_globals_is_refused_without_running_them(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    write_cifar10(directory)
    target = tmp_path / "touched"
    bad = write_batch(directory / "data_batch_1", {"data": _Planted(target), "labels": [0]}, 2)

    with pytest.raises(DataError, match="which no CIFAR batch holds") as info:
        load_dataset("cifar10", tmp_path, download=False)

    assert str(bad) in str(info.value)
    assert not target.exists()


def test_cifar_second_load_maps_the_npy_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_cifar10(tmp_path / "cifar-10-batches-py")
    first = fresh(lambda: load_images("cifar10", tmp_path, download=False))
    fail_to_decode(monkeypatch, "read_cifar_batch")

    second = fresh(lambda: load_images("cifar10", tmp_path, download=False))

    assert second is not first
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache").iterdir()) == ["x.npy", "y.npy"]
    assert second.x.tobytes() == first.x.tobytes()
    assert second.y.tolist() == first.y.tolist()
    assert second.x.shape == (12, 3, 32, 32)
    assert not second.x.flags.writeable


def test_cifar_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls: list[tuple[str, dict[str, Any]]] = []

    def fake(root: str, **kwargs: Any) -> None:
        calls.append((root, kwargs))
        write_cifar100(Path(root) / "cifar-100-python")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake)

    data = load_images("cifar100", tmp_path / "root")

    assert calls == [(str(tmp_path / "root"), {"train": True, "download": True})]
    assert data.y.tolist() == [99, 42, 0]


# --- not found -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "title", "searched", "fix"),
    [
        ("cifar10", "CIFAR-10", ("cifar-10-batches-py", "cifar10"), "download cifar-10-python.tar.gz from"),
        ("cifar100", "CIFAR-100", ("cifar-100-python", "cifar100"), "download cifar-100-python.tar.gz from"),
        ("emnist", "EMNIST (byclass)", ("EMNIST/raw", "emnist"), "copy the four emnist-byclass idx files"),
        ("emnist_letters", "EMNIST (letters)", ("EMNIST/raw", "emnist"), "copy the four emnist-letters idx"),
    ],
)
def test_not_found_with_download_off(
    tmp_path: Path,
    no_network: list[tuple[str, str, dict[str, Any]]],
    name: str,
    title: str,
    searched: tuple[str, str],
    fix: str,
) -> None:
    with pytest.raises(DataError, match="^" + re.escape(f"{title} was not found")) as info:
        load_dataset(name, tmp_path, download=False)

    message = str(info.value)
    dirs = ", ".join(str(tmp_path / d) for d in searched)
    assert f"was not found in {dirs} and downloading is off; {fix}" in message
    assert message.endswith(
        f"or enable downloading and run with internet access so torchvision can download it into {tmp_path}."
    )
    assert "\n" not in message
    assert no_network == []


@pytest.mark.parametrize(
    ("name", "torchvision_class", "options"),
    [
        ("cifar10", "CIFAR10", {}),
        ("emnist", "EMNIST", {"split": "byclass"}),
        ("emnist_balanced", "EMNIST", {"split": "balanced"}),
    ],
)
def test_failing_download_is_reported(
    tmp_path: Path,
    no_network: list[tuple[str, str, dict[str, Any]]],
    name: str,
    torchvision_class: str,
    options: dict[str, str],
) -> None:
    with pytest.raises(DataError, match="network unreachable") as info:
        load_dataset(name, tmp_path)

    assert no_network == [(torchvision_class, str(tmp_path), {"train": True, "download": True, **options})]
    assert str(info.value).endswith(
        f"or run with internet access so torchvision can download it into {tmp_path}."
    )


def test_download_that_leaves_nothing_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda root, **kwargs: None)

    with pytest.raises(DataError, match="left no batch files in " + str(tmp_path / "cifar-10-batches-py")):
        load_dataset("cifar10", tmp_path)


# --- EMNIST ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_emnist_images_come_back_transposed(tmp_path: Path, gz: bool) -> None:
    write_emnist(tmp_path / "EMNIST" / "raw", "byclass", [0, 61, 35], [10, 36], gz=gz)

    data = load_images("emnist", tmp_path, download=False)

    assert data.name == "emnist"
    assert data.num_classes == 62
    assert data.x.shape == (5, 1, 3, 2)
    np.testing.assert_array_equal(data.x[0, 0], [[1, 4], [2, 5], [3, 6]])
    expected = [STORED.T + base + 10 * i for base, n in ((0, 3), (100, 2)) for i in range(n)]
    np.testing.assert_array_equal(data.x[:, 0], np.stack(expected))
    assert data.y.tolist() == [0, 61, 35, 10, 36]
    assert data.mean == (0.1736,)
    assert data.std == (0.3317,)
    assert not data.x.flags.writeable


def test_emnist_letters_labels_start_at_zero(tmp_path: Path) -> None:
    write_emnist(tmp_path / "emnist", "letters", [1, 26, 13], [2])

    data = load_images("emnist_letters", tmp_path, download=False)

    assert data.num_classes == 26
    assert data.y.tolist() == [0, 25, 12, 1]


@pytest.mark.parametrize(("label", "stored"), [(0, 0), (27, 27)])
def test_emnist_letters_out_of_range(tmp_path: Path, label: int, stored: int) -> None:
    directory = tmp_path / "EMNIST" / "raw"
    write_emnist(directory, "letters", [1, label], [2])

    with pytest.raises(DataError) as info:
        load_dataset("emnist_letters", tmp_path, download=False)

    assert str(info.value) == (
        f"{directory / 'emnist-letters-train-labels-idx1-ubyte.gz'} has label {stored} but EMNIST (letters) "
        "has 26 classes, labelled 1 to 26 in its files; the file is from another data set, replace it."
    )


def test_emnist_byclass_label_out_of_range(tmp_path: Path) -> None:
    write_emnist(tmp_path / "EMNIST" / "raw", "byclass", [0], [62])

    with pytest.raises(
        DataError, match=r"emnist-byclass-test-labels-idx1-ubyte\.gz has label 62 but .* 62 classes;"
    ):
        load_dataset("emnist", tmp_path, download=False)


def test_emnist_splits_share_a_directory_and_its_search_order(tmp_path: Path) -> None:
    raw = tmp_path / "EMNIST" / "raw"
    write_emnist(raw, "byclass", [1], [2])
    write_emnist(raw, "balanced", [46], [45])
    write_emnist(tmp_path / "emnist", "byclass", [7], [8])

    assert load_images("emnist", tmp_path, download=False).y.tolist() == [1, 2]
    balanced = load_images("emnist_balanced", tmp_path, download=False)
    assert (balanced.num_classes, balanced.y.tolist()) == (47, [46, 45])
    (raw / "emnist-byclass-test-images-idx3-ubyte.gz").unlink()
    assert fresh(lambda: load_images("emnist", tmp_path, download=False)).y.tolist() == [7, 8]
    assert {"cifar10", "cifar100", "emnist", "emnist_balanced", "emnist_letters"} <= set(DATASETS.names())


def test_emnist_second_load_maps_the_npy_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_emnist(tmp_path / "EMNIST" / "raw", "letters", [1, 26], [3])
    first = fresh(lambda: load_images("emnist_letters", tmp_path, download=False))
    fail_to_decode(monkeypatch, "read_idx")

    second = fresh(lambda: load_images("emnist_letters", tmp_path, download=False))

    assert second.x.tobytes() == first.x.tobytes()
    assert second.x.shape == (3, 1, 3, 2)
    assert second.y.tolist() == [0, 25, 2]


def test_emnist_download_passes_the_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls: list[dict[str, Any]] = []

    def fake(root: str, **kwargs: Any) -> None:
        calls.append(kwargs)
        # torchvision extracts the .gz files it downloads: plain files are what it leaves.
        write_emnist(Path(root) / "EMNIST" / "raw", kwargs["split"], [3], [4], gz=False)

    monkeypatch.setattr(torchvision.datasets, "EMNIST", fake)

    data = load_images("emnist_balanced", tmp_path)

    assert calls == [{"split": "balanced", "train": True, "download": True}]
    assert data.y.tolist() == [3, 4]
