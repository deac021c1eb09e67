"""Fine-tuning a trained federation's model at several learning rates, chosen on validation.

Fine-tuning (``[finetune]``, FedAvg+FT) acts only at evaluation, so one trained federation serves
every setting: this script reloads completed runs' final state and, for each ``(lr, momentum)``,
fine-tunes every seen client's copy of the global model on its train split exactly as
``fedmem run`` does (:func:`fedmem.client.client_predictors`), then scores it on the client's
validation and test splits. Per run it prints each setting's mean validation and test accuracy
over the seen clients and picks the setting with the best mean **validation** accuracy; the last
line is the test accuracy of the validation-chosen setting, mean ± std over the runs (seeds).

As a diagnostic it also prints the global model's mean per-example gradient norm on the seen
clients' train splits (the loss the federation trained with): fine-tuning takes unclipped steps,
so a model trained with per-example clipping (DP-SGD, ``strategy.gradient = "dpsgd"``) may meet
gradients far larger than any step it was trained with.

Run, e.g.::

    python benchmarks/finetune_lr.py runs/dpsgd/*-s0 runs/dpsgd/*-s1 --lr 0.001,0.003,0.01 --momentum 0,0.9
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from private_memory import final_state  # this directory is on sys.path when run as a script

from fedmem.client import client_data, client_predictors
from fedmem.config import Config, load_config
from fedmem.federated_data import federation
from fedmem.strategy import ClientContext, ModelPredictor
from fedmem.training import accuracy, per_example_gradients, per_example_norms
from fedmem.updates import Arrays


def gradient_norms(ctx: ClientContext, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The global model's per-example gradient L2 norms (all parameters jointly) under the run's loss."""
    predictor = next(p for label, p in client_predictors(ctx) if label == "global")  # the first one
    assert isinstance(predictor, ModelPredictor)
    _, grads = per_example_gradients(predictor.model, (x, y), ctx.loss())
    return per_example_norms(grads).numpy()


def measure(cfg: Config, received: Arrays, lr: float, momentum: float) -> tuple[float, float]:
    """Mean validation and test accuracy of the fine-tuned model over the seen clients."""
    c = cfg.replace(
        finetune=dataclasses.replace(cfg.finetune, lr=lr, momentum=momentum),
        eval=dataclasses.replace(cfg.eval, personalizers=("finetune",), adapt_steps=()),
    )
    fed = federation(c)
    val, test = [], []
    for pid in (p for p in range(len(fed.clients)) if p not in fed.unseen):
        data, (x_test, y_test) = client_data(c, pid)
        ctx = ClientContext(c, pid, c.rounds, data, received)
        tuned = next(p for label, p in client_predictors(ctx) if label == "finetune")
        val.append(accuracy(tuned.predict(data.x_val), data.y_val.numpy()))
        test.append(accuracy(tuned.predict(x_test), y_test.numpy()))
    return float(np.mean(val)), float(np.mean(test))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="completed run directories (one per seed)")
    parser.add_argument("--lr", default="0.001,0.003,0.01", help="comma-separated finetune.lr values")
    parser.add_argument("--momentum", default="0,0.9", help="comma-separated finetune.momentum values")
    parser.add_argument(
        "--grad-examples", type=int, default=64, help="examples per client for the gradient norms"
    )
    args = parser.parse_args()
    grid = [(float(lr), float(m)) for lr in args.lr.split(",") for m in args.momentum.split(",")]
    chosen: list[float] = []
    for run in args.runs:
        cfg = load_config(str(run / "config.toml"))
        received = final_state(run, cfg)
        fed = federation(cfg)
        norms = []
        for pid in (p for p in range(len(fed.clients)) if p not in fed.unseen):
            data, _ = client_data(cfg, pid)
            ctx = ClientContext(cfg, pid, cfg.rounds, data, received)
            norms.append(
                gradient_norms(ctx, data.x_train[: args.grad_examples], data.y_train[: args.grad_examples])
            )
        g = np.concatenate(norms)
        print(
            f"{run}: seed {cfg.seed}, final round; global model's per-example gradient norm: "
            f"median {np.median(g):.2f}, 90th percentile {np.percentile(g, 90):.2f}, mean {g.mean():.2f}"
        )
        print(f"  {'finetune.lr':>11s} {'momentum':>8s} {'val acc':>7s} {'test acc':>8s}")
        results = {}
        for lr, m in grid:
            results[(lr, m)] = measure(cfg, received, lr, m)
            print(
                f"  {lr:11g} {m:8g} {100 * results[(lr, m)][0]:7.2f} {100 * results[(lr, m)][1]:8.2f}",
                flush=True,
            )
        best = max(results, key=lambda k: results[k][0])
        chosen.append(results[best][1])
        print(
            f"  chosen on validation: lr {best[0]:g}, momentum {best[1]:g}: test {100 * results[best][1]:.2f}"
        )
    std = np.std(chosen)  # population, as every table of fedmem
    print(
        f"fine-tuned, setting chosen on validation per run: test accuracy {100 * np.mean(chosen):.1f} ± "
        f"{100 * std:.1f} % (mean ± std (ddof 0) over {len(chosen)} runs, seen clients, final round)"
    )


if __name__ == "__main__":
    main()
