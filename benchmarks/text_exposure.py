"""Secret-Sharer exposure on text: 10 canaries ranked against every one of 10^6 secrets.

Workload: the text scenario's character GRU (128 hidden units) and its largest seen client
(its train windows fill a kNN-Per memory of ``memory.capacity`` pairs). For the
global model's predictor and the kNN-Per predictor, time:

* ``exact``: log-perplexity of all 10^6 secrets of "the random number is ######" by walking the
  tree of secrets (111,111 one-character GRU steps, kNN queries at every node), then the exact
  rank of 10 canaries among them;
* ``sampled``: 10 canaries and 10,000 sampled references by batched teacher forcing;
* ``naive``: teacher forcing whole lines, as without the tree, on 2,000 secrets, extrapolated
  to 10^6 (what the tree saves).

The weights are untrained: timings do not depend on them. Threads: every core of this machine
(torch and FAISS). Target (issue 9): exposure of 10 canaries against 10^6 exact candidates
<= 60 s on 2 cores.

Usage: ``python benchmarks/text_exposure.py [--capacity 50000] [--index flat]``
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping

import numpy as np
import torch

from fedmem.canary_scoring import code_numbers, exact_log_perplexities, exact_ranks, log_perplexities
from fedmem.config import load_config
from fedmem.federated_data import client_data, federation, new_model
from fedmem.memory.datastore import set_faiss_threads
from fedmem.probes.canaries import CanaryFormat, sample_distinct_codes
from fedmem.strategy import ClientContext, ModelPredictor, Predictor
from strategies.knnper import KnnPer


class _WholeWindows:
    """Hides ``from_outputs`` so scoring takes the whole-window path."""

    info: Mapping[str, float] = {}

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self.inner.predict(x)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--capacity", type=int, default=50000)
    parser.add_argument("--index", default="flat", help="memory.index: flat, ivf or hnsw")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    set_faiss_threads(cores)
    cfg = load_config(
        "text", [f"memory.capacity={args.capacity}", f"memory.index='{args.index}'", "memory.k_grid=[10]"]
    )
    fed = federation(cfg)
    pid = max(fed.seen, key=lambda p: len(fed.clients[p].train))  # the largest memory
    data, _ = client_data(cfg, pid)
    model = new_model(cfg)
    ctx = ClientContext(cfg, pid, 1, data)
    t = time.perf_counter()
    knn = KnnPer(cfg).personalize(model, ctx)
    built = time.perf_counter() - t
    fmt = CanaryFormat(cfg.audit.canary_format)
    codes = sample_distinct_codes(fmt, 10 + 10_000, np.random.default_rng(0))
    canaries, references = codes[:10], codes[10:]
    pairs = min(data.y_train.numel(), args.capacity)
    print(f"memory index: {args.index}")
    print(
        f"{cores} cores; client {pid}: {len(data.y_train)} train windows, "
        f"memory of {pairs} pairs built in {built:.1f} s"
    )
    print(f"{'predictor':<10}{'exact 10^6 (s)':>16}{'sampled 10^4 (s)':>18}{'naive 10^6 (s, est.)':>22}")
    for label, predictor in (("global", ModelPredictor(model)), ("kNN-Per", knn)):
        t = time.perf_counter()
        every = exact_log_perplexities(predictor, fmt)
        assert every is not None
        ranks = exact_ranks(every, code_numbers(fmt, canaries))
        exact = time.perf_counter() - t
        t = time.perf_counter()
        log_perplexities(predictor, fmt, canaries)
        log_perplexities(predictor, fmt, references)
        sampled = time.perf_counter() - t
        t = time.perf_counter()
        log_perplexities(_WholeWindows(predictor), fmt, references[:2000])
        naive = (time.perf_counter() - t) * fmt.space_size / 2000
        print(
            f"{label:<10}{exact:>16.1f}{sampled:>18.1f}{naive:>22.0f}"
            f"   (ranks of the 10: {ranks.min()}..{ranks.max()})"
        )
    print("target: exact exposure of 10 canaries against 10^6 candidates <= 60 s on 2 cores")


if __name__ == "__main__":
    main()
