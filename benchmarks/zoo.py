"""Every strategy on one scenario: final-round test accuracy per predictor, and wall time.

Runs ``fedmem run SCENARIO --set strategy.name=<name>`` for each strategy in turn (each a full
run directory under ``--out``) and prints one markdown table: per strategy and predictor, the
mean / sample-weighted mean / 10th percentile of per-client test accuracy over seen clients,
the mean over unseen clients, and the run's wall time. kNN-Per and fine-tuning rows sit on the
strategy's own deployed model ("Ditto + kNN-Per"). ``finetune`` and ``knnper`` train exactly
like ``fedavg`` (their predictors appear on every run), so they are not run again.

Usage: ``python benchmarks/zoo.py [--scenario default] [--strategies fedavg,ditto] [--engine flower]
[--out runs/zoo] [--set KEY=VALUE ...]``; ``fedbn`` gets ``model.name = "cnn_bn"``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedmem.config import load_config
from fedmem.federation.sessions import run_on_engine
from fedmem.reports.directories import predictor_title
from strategies import STRATEGIES

SKIP = ("finetune", "knnper")  # FedAvg training: identical to the fedavg run
EXTRA = {"fedbn": ["model.name=cnn_bn"]}


def _pct(stats: dict[str, float] | None, key: str) -> str:
    return "-" if not stats else f"{100 * stats[key]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--strategies", default=",".join(n for n in STRATEGIES.names() if n not in SKIP))
    parser.add_argument("--engine", default="flower", choices=["flower", "inprocess"])
    parser.add_argument("--out", default="runs/zoo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = []
    for name in args.strategies.split(","):
        overrides = [
            *args.overrides,
            *EXTRA.get(name, []),
            f"strategy.name={name}",
            f"runtime.engine={args.engine}",
            f"runtime.output_dir='{Path(args.out) / name}'",
        ]
        cfg = load_config(args.scenario, overrides)
        start = time.perf_counter()
        summary = run_on_engine(cfg).summary()
        wall = time.perf_counter() - start
        predictors = summary["predictors"]
        for label in predictors:
            seen, unseen = summary["accuracy"].get(label), summary["unseen_accuracy"].get(label)
            cells = [_pct(seen, "mean"), _pct(seen, "weighted_mean"), _pct(seen, "p10"), _pct(unseen, "mean")]
            rows.append(
                f"| `{name}` | {predictor_title(summary, label)} | {' | '.join(cells)} | {wall:.0f} |"
            )
        print(rows[-1], flush=True)
    seed = load_config(args.scenario).seed
    print(f"\nscenario {args.scenario}, final round, seed {seed}; test accuracy (%) over clients")
    print("| strategy | predictor | seen mean | seen wtd | seen p10 | unseen mean | wall s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
