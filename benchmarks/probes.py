"""Time each memorization probe at the size a real audit feeds it.

Sizes: 100k reference canaries for exposure; 256 shadow models x 50k examples for
LiRA; 64 models x 60k examples for counterfactual memorization and the hold-out
C-score. Input generation is not timed; each figure is the best of ``--repeats``
runs. Every estimator is vectorized, so each should take at most a few seconds.

Run::

    python benchmarks/probes.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from fedmem import probes
from fedmem.seeding import rng


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Smallest wall-clock time of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per estimator; the best is reported")
    args = parser.parse_args()
    gen = rng(0, "benchmarks", "probes")

    # Exposure: 100k reference log-perplexities, 1k canaries.
    refs = gen.gamma(9.0, 0.5, size=100_000)
    canaries = gen.gamma(9.0, 0.5, size=1_000)
    fmt = probes.CanaryFormat("the random number is {}{}{}{}{}{}{}{}{}")

    # LiRA: 256 shadow models x 50k examples, about half IN for each example.
    n_shadow, n_lira = 256, 50_000
    shadow_in = gen.random((n_shadow, n_lira)) < 0.5
    mu = gen.normal(0.0, 4.0, n_lira)
    shadow = mu + 2.0 * shadow_in + gen.normal(size=(n_shadow, n_lira))
    member = gen.random(n_lira) < 0.5
    target = mu + 2.0 * member + gen.normal(size=n_lira)
    logits = gen.normal(size=(16, n_lira, 10))
    labels = gen.integers(0, 10, size=n_lira)

    # Counterfactual memorization: 64 models x 60k examples, half IN per model, 0/1 correctness.
    n_models, n_cf = 64, 60_000
    membership = np.argsort(gen.random((n_models, n_cf)), axis=1) < n_cf // 2
    correct = np.where(membership, gen.random((n_models, n_cf)) < 0.95, gen.random((n_models, n_cf)) < 0.7)
    test_correct = (gen.random((n_models, 1_000)) < 0.8).astype(np.float64)
    embeddings = gen.normal(size=(10_000, 64))
    emb_labels = gen.integers(0, 10, size=10_000)
    epochs_correct = gen.random((100, n_cf)) < 0.8

    rows: list[tuple[str, str, Callable[[], object]]] = [
        (
            "make_canaries",
            "4 canaries + 100k references",
            lambda: probes.make_canaries(fmt, (1, 2, 4, 8), 100_000, rng(0, "c")),
        ),
        (
            "exposure_by_rank",
            "1k canaries vs 100k references",
            lambda: probes.exposure_by_rank(canaries, refs),
        ),
        (
            "exposure_by_extrapolation",
            "skew-normal fit on 100k + 1k canaries",
            lambda: probes.exposure_by_extrapolation(canaries, refs),
        ),
        (
            "attack_metrics",
            "50k scores (ROC, AUC, TPR@FPR, advantage)",
            lambda: probes.attack_metrics(target, member),
        ),
        (
            "logit_scaled_confidence_from_logits",
            "16 x 50k x 10 logits",
            lambda: probes.logit_scaled_confidence_from_logits(logits, labels),
        ),
        ("lira_online", "256 shadows x 50k examples", lambda: probes.lira_online(target, shadow, shadow_in)),
        (
            "lira_online(fixed_variance)",
            "256 shadows x 50k examples",
            lambda: probes.lira_online(target, shadow, shadow_in, fixed_variance=True),
        ),
        (
            "lira_offline",
            "256 shadows x 50k examples",
            lambda: probes.lira_offline(target, shadow, shadow_in),
        ),
        (
            "counterfactual_memorization",
            "64 models x 60k examples",
            lambda: probes.counterfactual_memorization(membership, correct),
        ),
        (
            "counterfactual_influence",
            "64 models x 60k train x 1k test",
            lambda: probes.counterfactual_influence(membership, test_correct),
        ),
        ("holdout_cscore", "64 models x 60k examples", lambda: probes.holdout_cscore(membership, correct)),
        (
            "kernel_density_cscore",
            "10k embeddings x 64 dims",
            lambda: probes.kernel_density_cscore(embeddings, emb_labels),
        ),
        ("learning_speed", "100 epochs x 60k examples", lambda: probes.learning_speed(epochs_correct)),
    ]

    print(f"{'estimator':<38} {'size':<44} {'seconds':>8}")
    print("-" * 92)
    for name, size, fn in rows:
        print(f"{name:<38} {size:<44} {best_of(args.repeats, fn):>8.3f}", flush=True)


if __name__ == "__main__":
    main()
