"""Speed and recall of kNN-Per's memory: FAISS flat vs numpy brute force vs IVF / HNSW.

Run ``python benchmarks/knn.py`` (``--quick`` for a smaller run, ``--threads N`` to pin
FAISS's OpenMP threads). Prints three tables:

1. One large store (default 50k x 64) searched with 1k and 10k queries, k = 10: build and
   search seconds and recall@10 against exact search, on isotropic Gaussian vectors (the
   hardest case for approximate indexes) and on clustered vectors (closer to class-structured
   embeddings).
2. Per-client stores of a few hundred to a few thousand entries, as kNN-Per builds them:
   flat build, search (k = 50), p_kNN, and (lambda, k) selection on a validation split.
3. The memory a flat store holds (n * d * 4 bytes).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import faiss
import numpy as np
from numpy.typing import NDArray

from fedmem.memory.datastore import Datastore, ivf_nlist, set_faiss_threads
from fedmem.memory.knn import knn_probabilities, select_lambda_k

Array = NDArray[np.float32]
T = TypeVar("T")


def timed(fn: Callable[[], T], repeats: int = 1) -> tuple[float, T]:
    """Best wall-clock seconds over ``repeats`` calls, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def numpy_knn(x: Array, q: Array, k: int, chunk: int = 1024) -> NDArray[np.int64]:
    """Exact kNN ids by brute force: ||q||^2 - 2 q.x + ||x||^2, argpartition, sort; chunked."""
    x_sq = (x * x).sum(axis=1)  # (n,)
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        qc = q[s : s + chunk]  # (c, d)
        d2 = x_sq[None, :] - 2.0 * (qc @ x.T)  # (c, n); ||q||^2 is constant per row
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]  # (c, k) unordered
        order = np.argsort(np.take_along_axis(d2, part, axis=1), axis=1)
        out[s : s + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: NDArray[np.int64], exact: NDArray[np.int64]) -> float:
    """Mean fraction of the exact k neighbours that were found."""
    hits = sum(len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found, exact, strict=True))
    return hits / exact.size


def make_data(kind: str, n: int, m: int, d: int, seed: int) -> tuple[Array, Array]:
    """(n, d) store and (m, d) queries, float32: isotropic Gaussian or 100 Gaussian clusters."""
    gen = np.random.default_rng(seed)
    if kind == "gaussian":
        return gen.normal(size=(n, d)).astype(np.float32), gen.normal(size=(m, d)).astype(np.float32)
    centers = gen.normal(size=(100, d)) * 3.0

    def draw(count: int) -> Array:
        return (centers[gen.integers(0, 100, size=count)] + gen.normal(size=(count, d))).astype(np.float32)

    return draw(n), draw(m)


def large_store(n: int, d: int, query_counts: list[int], k: int) -> None:
    print(f"\n== one store: n={n:,} d={d} k={k}, {faiss.omp_get_max_threads()} FAISS thread(s) ==")
    header = f"{'data':9} {'method':23} {'build s':>8}"
    header += "".join(f" {f'search {m // 1000}k s':>12} {'recall':>7}" for m in query_counts)
    print(header)
    nlist = ivf_nlist(n)
    indexes: list[tuple[str, dict[str, int | str]]] = [
        ("faiss flat (exact)", {"index": "flat"}),
        *[(f"ivf nlist={nlist} nprobe={p}", {"index": "ivf", "nprobe": p}) for p in (1, 8, 32)],
        *[(f"hnsw M=32 ef={ef}", {"index": "hnsw", "ef_search": ef}) for ef in (64, 128)],
    ]
    for kind in ("gaussian", "clustered"):
        x, q_all = make_data(kind, n, max(query_counts), d, seed=0)
        ids = np.arange(n)
        exact: dict[int, NDArray[np.int64]] = {}
        for name, options in indexes:
            t_build, store = timed(partial(Datastore, x, ids, **options))  # type: ignore[arg-type]
            line = f"{kind:9} {name:23} {t_build:8.3f}"
            for m in query_counts:
                t, (_, found) = timed(partial(store.search, q_all[:m], k), repeats=2)
                exact.setdefault(m, found)  # the flat row comes first and is the reference
                line += f" {t:12.3f} {recall(found, exact[m]):7.3f}"
            print(line)
        # Last: numpy's OpenBLAS threads keep spinning after a matmul and slow FAISS down.
        line = f"{kind:9} {'numpy brute force':23} {0.0:8.3f}"
        for m in query_counts:
            t, found = timed(partial(numpy_knn, x, q_all[:m], k), repeats=2)
            line += f" {t:12.3f} {recall(found, exact[m]):7.3f}"
        print(line)


def per_client(sizes: list[int], d: int, num_classes: int, k_max: int) -> None:
    k_grid = [k for k in (1, 3, 5, 10, 20, 50) if k <= k_max]
    lambda_grid = np.linspace(0.0, 1.0, 11).tolist()
    print(
        f"\n== per-client stores: d={d}, C={num_classes}, queries = 25% of n, k={k_max}, "
        f"{faiss.omp_get_max_threads()} FAISS thread(s); "
        f"selection over {len(k_grid)} k x {len(lambda_grid)} lambda =="
    )
    print(f"{'n':>6} {'queries':>8} {'build ms':>9} {'search ms':>10} {'p_kNN ms':>9} {'select ms':>10}")
    gen = np.random.default_rng(1)
    for n in sizes:
        m = max(1, n // 4)
        centers = gen.normal(size=(num_classes, d)) * 2.0
        y = gen.integers(0, num_classes, size=n)
        yq = gen.integers(0, num_classes, size=m)
        x = (centers[y] + gen.normal(size=(n, d))).astype(np.float32)
        q = (centers[yq] + gen.normal(size=(m, d))).astype(np.float32)
        p_model = gen.dirichlet(np.ones(num_classes), size=m)
        t_build, store = timed(partial(Datastore, x, y), repeats=5)
        t_search, (dist, lab) = timed(partial(store.search, q, k_max), repeats=5)
        t_p, _ = timed(partial(knn_probabilities, dist, lab, num_classes, 1.0), repeats=5)
        select = partial(
            select_lambda_k,
            dist,
            lab,
            p_model,
            yq,
            num_classes=num_classes,
            temperature=1.0,
            k_grid=k_grid,
            lambda_grid=lambda_grid,
        )
        t_sel, _ = timed(select, repeats=3)
        print(
            f"{n:6d} {m:8d} {t_build * 1e3:9.2f} {t_search * 1e3:10.2f} {t_p * 1e3:9.2f} {t_sel * 1e3:10.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10k store, 1k queries")
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads (0 = leave as is)")
    args = parser.parse_args()
    if args.threads:
        set_faiss_threads(args.threads)
    n, queries = (10_000, [1000]) if args.quick else (50_000, [1000, 10_000])
    d = 64
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    # Per-client first: it is what kNN-Per runs, and nothing has warmed BLAS thread pools yet.
    threads = faiss.omp_get_max_threads()
    per_client([200, 500, 1000, 2000, 5000], d, num_classes=10, k_max=50)
    per_client([500, 2000], d, num_classes=62, k_max=50)
    if threads != 1:  # a Ray actor with num_cpus=1 runs FAISS on one thread
        set_faiss_threads(1)
        per_client([200, 500, 1000, 2000, 5000], d, num_classes=10, k_max=50)
        set_faiss_threads(threads)
    large_store(n, d, queries, k=10)
    print(f"\nflat store memory: n * d * 4 bytes = {n * d * 4 / 2**20:.1f} MiB for n={n:,}, d={d}")


if __name__ == "__main__":
    main()
