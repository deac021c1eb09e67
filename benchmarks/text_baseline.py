"""Unigram baselines for a text run: what next-character accuracy is worth without a model.

Reads a finished run directory of a text scenario (``fedmem run text``) and prints, over the
same clients and with the same aggregation as the run's table (unweighted mean of per-client
test accuracies, seen and unseen clients apart):

* ``unigram (federation)``: always predict the most frequent character of all seen clients'
  train text (a space, in the stdlib corpus);
* ``unigram (own client)``: each client predicts its own train text's most frequent character;

beside the run's final-round accuracies for every predictor.

Usage: ``python benchmarks/text_baseline.py RUN_DIR``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedmem.config import load_config
from fedmem.federated_data import client_data, federation
from fedmem.results import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    cfg = load_config(str(args.run_dir / "config.toml"))
    fed = federation(cfg)
    clients = range(len(fed.clients))
    data = {pid: client_data(cfg, pid) for pid in clients}
    counts = sum(np.bincount(data[p][0].y_train.numpy().reshape(-1), minlength=98) for p in fed.seen)
    top = int(np.argmax(counts))
    rows: dict[str, dict[bool, list[float]]] = {"unigram (federation)": {}, "unigram (own client)": {}}
    for pid in clients:
        train, (_, y_test) = data[pid][0].y_train.numpy(), data[pid][1]
        own = int(np.argmax(np.bincount(train.reshape(-1), minlength=98)))
        seen = pid not in fed.unseen
        rows["unigram (federation)"].setdefault(seen, []).append(float((y_test.numpy() == top).mean()))
        rows["unigram (own client)"].setdefault(seen, []).append(float((y_test.numpy() == own).mean()))
    summary = run.summary()
    print(f"{cfg.name}: {len(fed.seen)} seen and {len(fed.unseen)} unseen clients, final round {cfg.rounds}")
    print(f"{'predictor':<24}{'seen mean %':>12}{'unseen mean %':>15}")
    for name, by_seen in rows.items():
        unseen_mean = np.mean(by_seen.get(False, [np.nan]))
        print(f"{name:<24}{100 * np.mean(by_seen[True]):>12.1f}{100 * unseen_mean:>15.1f}")
    for label, stats in summary["accuracy"].items():
        unseen = summary.get("unseen_accuracy", {}).get(label, {}).get("mean", float("nan"))
        print(f"{label:<24}{100 * stats['mean']:>12.1f}{100 * unseen:>15.1f}")


if __name__ == "__main__":
    main()
