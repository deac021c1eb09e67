"""kNN-Per's memory: a FAISS datastore per client and the pure kNN numerics on top of it."""

from fedmem.memory.datastore import (
    INDEXES,
    Datastore,
    IndexOptions,
    add_noise,
    exact_copies,
    ivf_nlist,
    set_faiss_threads,
)
from fedmem.memory.knn import Selection, accuracy_grid, interpolate, knn_probabilities, select_lambda_k

__all__ = [
    "INDEXES",
    "Datastore",
    "IndexOptions",
    "Selection",
    "accuracy_grid",
    "add_noise",
    "exact_copies",
    "interpolate",
    "ivf_nlist",
    "knn_probabilities",
    "select_lambda_k",
    "set_faiss_threads",
]
