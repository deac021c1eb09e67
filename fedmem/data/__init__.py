"""Data sets and their partition among clients (see docs/architecture.md).

:mod:`fedmem.data.datasets` loads image data sets into memory once per process;
:mod:`fedmem.data.partition` turns a label array into a federation of clients,
each with its own train / validation / test split.
"""

from fedmem.data.datasets import DATASETS, SEARCH_PATHS, ImageData, load_dataset, to_tensor
from fedmem.data.partition import (
    SCHEMES,
    ClientSplit,
    Federation,
    build_federation,
    choose_unseen,
    label_skew,
    partition_labels,
    smallest_splittable,
    split_client,
)

__all__ = [
    "DATASETS",
    "SCHEMES",
    "SEARCH_PATHS",
    "ClientSplit",
    "Federation",
    "ImageData",
    "build_federation",
    "choose_unseen",
    "label_skew",
    "load_dataset",
    "partition_labels",
    "smallest_splittable",
    "split_client",
    "to_tensor",
]
