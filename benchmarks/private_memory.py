"""Accuracy and membership leakage of kNN-Per's memory with and without the private-memory options.

The options (``memory.exclude_self``, ``memory.embedding_noise``, ``memory.capacity``) act only
when a client builds and searches its memory, never in training, so one trained federation
serves every setting: this script reloads a completed run's final state and scores each client
through :func:`fedmem.client.score_client`, the function ``fedmem audit`` calls, under each
setting. Per setting and predictor it prints the mean test accuracy of seen and unseen clients
and the loss-threshold membership AUC (Yeom et al., CSF 2018; members = each seen client's train
split, non-members = its test split), as the mean of per-client AUCs and pooled over clients,
the two figures of ``fedmem audit``'s table, and, when RUN is the ``target`` folder of an audit
with image canaries, the canaries' exposure at the most repetitions (bits). With the settings'
default ``"off"`` the accuracies equal the run's own table.

Run, e.g.::

    fedmem run default --engine inprocess --set rounds=2 --set 'eval.personalizers=["knnper"]' --out /tmp/kp
    python benchmarks/private_memory.py /tmp/kp/default-* --setting exclude_self=true \\
        --setting embedding_noise=0.15 --setting "exclude_self=true embedding_noise=0.15 capacity=200"

Each ``--setting`` is a space-separated list of ``[memory]`` overrides (TOML values).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmem import leakage
from fedmem.client import get_strategy, score_client
from fedmem.config import Config, load_config
from fedmem.federated_data import federation, held_out
from fedmem.updates import Arrays


def parse_setting(text: str) -> dict[str, Any]:
    """``"exclude_self=true capacity=200"`` -> ``{"exclude_self": True, "capacity": 200}``."""
    return tomllib.loads("\n".join(text.split())) if text.strip() != "off" else {}


def final_state(run: Path, cfg: Config) -> Arrays:
    """What clients received after the last round of the completed run ``run``."""
    tensors = torch.load(run / "state.pt", weights_only=True)
    state = {name: {k: t.numpy() for k, t in weights.items()} for name, weights in tensors.items()}
    return get_strategy(cfg).broadcast(state, cfg.rounds)


def measure(cfg: Config, received: Arrays, memory: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per predictor: ``accuracy_seen``, ``accuracy_unseen``, ``mia_auc``, ``pooled_auc``, ``exposure``.

    ``mia_auc`` is the mean of the seen clients' AUCs, ``pooled_auc`` the AUC of their pooled scores;
    ``exposure`` (bits; NaN unless ``cfg`` is an audit's target with image canaries) the mean over
    the inserting clients of their canaries' exposure at the most repetitions, as ``fedmem audit``
    computes it.
    """
    c = cfg.replace(memory=dataclasses.replace(cfg.memory, **memory))
    fed = federation(c)
    held = held_out(c)
    top = f"exposure_r{max(c.audit.repetitions)}"
    exposure: dict[str, list[float]] = {}
    acc: dict[str, dict[bool, list[float]]] = {}
    aucs: dict[str, list[float]] = {}
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for pid in range(len(fed.clients)):
        seen = pid not in fed.unseen
        for label, s in score_client(c, pid, c.rounds, received).items():
            acc.setdefault(label, {True: [], False: []})[seen].append(float(s["test/correct"].mean()))
            if seen:
                member, nonmember = s["train/loss"], s["test/loss"]
                aucs.setdefault(label, []).append(leakage.membership(member, nonmember)["mia_auc"])
                truth = np.concatenate([np.ones(len(member), bool), np.zeros(len(nonmember), bool)])
                pairs.setdefault(label, []).append((-np.concatenate([member, nonmember]), truth))
            if held is not None and "canary/loss" in s:
                e = leakage.exposure(s["canary/loss"], s["reference/loss"], held[1], pid)
                if top in e:
                    exposure.setdefault(label, []).append(e[top])
    return {
        label: {
            "accuracy_seen": float(np.mean(acc[label][True])),
            "accuracy_unseen": float(np.mean(acc[label][False])) if acc[label][False] else float("nan"),
            "mia_auc": float(np.mean(aucs[label])),
            "pooled_auc": leakage.pooled_roc(pairs[label])[2],
            "exposure": float(np.mean(exposure[label])) if exposure.get(label) else float("nan"),
        }
        for label in acc
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a completed run directory (fedmem run ... --out DIR)")
    parser.add_argument("--setting", action="append", default=[], help="[memory] overrides; repeatable")
    args = parser.parse_args()
    cfg = load_config(str(args.run / "config.toml"))
    received = final_state(args.run, cfg)
    print(f"{args.run}: {cfg.rounds} rounds, seed {cfg.seed}, final round")
    print(
        f"{'setting':44s} {'predictor':9s} {'acc seen':>8s} {'unseen':>7s} {'AUC mean':>8s} {'pooled':>7s}"
        f" {'exposure':>8s}"
    )
    for text in ["off", *args.setting]:
        start = time.perf_counter()
        for label, r in measure(cfg, received, parse_setting(text)).items():
            print(
                f"{text:44s} {label:9s} {100 * r['accuracy_seen']:8.2f} {100 * r['accuracy_unseen']:7.2f} "
                f"{r['mia_auc']:8.4f} {r['pooled_auc']:7.4f} {r['exposure']:8.2f}",
                flush=True,
            )
        print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
