"""Cost of the coherent-gradient local steps: time per step of mean vs winsorized vs median3.

Workload: the default CNN (``model.name = "cnn"``, 64-d embedding, 114k parameters) on
Fashion-MNIST-shaped inputs (random pixels: the cost does not depend on them), mini-batches
of 32, SGD with momentum 0.9, one torch thread (what one Ray actor gets). Each rule runs the
training loop for ``--steps`` steps after ``--warmup`` steps; one run, so the figures carry the
machine's noise. ``winsorized`` computes 32 per-example gradients with ``torch.func.vmap``;
``median3`` three mini-batch gradients per step (Chatterjee, ICLR 2020; Zielinski, Krishnan and
Chatterjee, arXiv:2003.07422).

Usage: ``python benchmarks/coherent.py [--steps 100] [--warmup 5] [--winsor-c 1]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fedmem.models import build_model
from fedmem.training import GRADIENTS, SGDSettings, cross_entropy_step, gradient_rule, train


def seconds_per_step(rule: str, steps: int, warmup: int, winsor_c: int) -> float:
    """Wall seconds per local step of ``rule`` on the default CNN (after ``warmup`` steps)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2048,), generator=g)
    model = build_model("cnn", (1, 28, 28), 10, 64, 0)
    step = cross_entropy_step(None, gradient_rule(rule, winsor_c))

    def run(n: int) -> float:
        settings = SGDSettings(lr=0.01, momentum=0.9, steps=n, batch_size=32)
        start = time.perf_counter()
        train(model, x, y, settings, np.random.default_rng(0), step=step)
        return time.perf_counter() - start

    run(warmup)
    return run(steps) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--winsor-c", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times = {rule: seconds_per_step(rule, args.steps, args.warmup, args.winsor_c) for rule in GRADIENTS}
    print(f"default CNN, batch 32, 1 thread, {args.steps} steps each (torch {torch.__version__})")
    print(f"{'gradient':<12}{'ms/step':>10}{'x mean':>9}")
    for rule, t in times.items():
        print(f"{rule:<12}{1000 * t:>10.2f}{t / times['mean']:>9.2f}")


if __name__ == "__main__":
    main()
