"""Label-noise memorization under the mitigations, on the same seeds (docs/benchmarks.md,
"Label-noise memorization and the mitigations").

Arpit et al. (ICML 2017) measure memorization as how much of a set of flipped training labels a
network fits. ``simulations/label_noise.toml`` flips 40 % of chosen clients' train labels; every
run's summary reports, per predictor, the accuracy on those flipped examples against their noisy
labels (memorized) and their original ones (true), beside the clean test accuracy. This script
reads sweeps of that scenario, one setting per grid value, for example::

    fedmem compare label_noise --strategies fedavg --seeds 0,1,2 --grid strategy.loss=ce,rll,gce \\
        --engine inprocess --out runs/ln_loss
    fedmem compare label_noise --strategies fedavg --seeds 0,1,2 \\
        --grid update.aggregate=median,trimmed_mean --set update.trim_fraction=0.25 \\
        --engine inprocess --out runs/ln_agg
    fedmem compare label_noise --strategies fedavg --seeds 0,1,2 --grid strategy.gradient=median3 \\
        --engine inprocess --out runs/ln_med3
    python benchmarks/label_noise.py runs/ln_loss/label_noise-sweep-* runs/ln_agg/label_noise-sweep-* \\
        runs/ln_med3/label_noise-sweep-*

and prints, per setting and predictor (final round; mean ± std over seeds; seen clients): the
memorized and true-label accuracy on the flipped examples (mean over the noisy seen clients),
the clean test accuracy (mean over every seen client), the C-score AUC (how well the global model's
learning speed finds the flipped examples), and the differences to the baseline setting
(``--baseline``, default the sweep federation with ``strategy.loss=ce``) **paired by seed**: same
clients, same flips, same initial model.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmem.reports.directories import Result, load_sweep


def _fmt(values: Sequence[float], signed: bool = False) -> str:
    a = 100 * np.asarray(values, np.float64)
    if not len(a):
        return "-"
    sign = "+" if signed else ""
    return f"{a.mean():{sign}.1f}" if len(a) == 1 else f"{a.mean():{sign}.1f} ± {a.std():.1f}"


def figures(r: Result, label: str) -> dict[str, float]:
    """Memorized, true-label and clean test accuracy of one predictor (NaN where not reported)."""
    s = r.summary
    out = {
        "memorized": s.get("noisy_memorized", {}).get(label, {}).get("mean", np.nan),
        "true": s.get("noisy_true", {}).get(label, {}).get("mean", np.nan),
        "clean": s.get("accuracy", {}).get(label, {}).get("mean", np.nan),
    }
    cscore = s.get("noisy_cscore_auc", {}).get(label)
    out["cscore"] = cscore["mean"] if cscore else np.nan
    return out


def _paired(f: dict[int, dict[str, float]], base: dict[int, dict[str, float]], key: str) -> str:
    """``f - base`` of ``key`` seed by seed (same clients, flips and initial model), mean ± std."""
    return _fmt([f[s][key] - base[s][key] for s in base], signed=True)


def setting_of(r: Result) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.grid.items()) or "(scenario)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories of the label_noise scenario")
    parser.add_argument(
        "--baseline", default="strategy.loss=ce", help="the setting the others are paired with"
    )
    parser.add_argument("--predictors", default="global,finetune", help="comma-separated predictor labels")
    args = parser.parse_args()
    results: list[Result] = []
    for path in args.sweeps:
        done, missing = load_sweep(path)
        results += done
        for name, status in missing:
            print(f"{path}/{name} did not complete ({status}); left out")
    settings: dict[str, dict[int, Result]] = {}
    for r in results:
        settings.setdefault(setting_of(r), {})[r.seed] = r
    base = settings.get(args.baseline)
    if base is None:
        raise SystemExit(
            f"no federation with the baseline setting {args.baseline!r}; settings: {list(settings)}"
        )
    labels = args.predictors.split(",")
    any_result = results[0]
    print(
        "\n(final round; mean ± std over seeds; memorized / true: accuracy (%) on the flipped train "
        "examples against their noisy / original labels, mean over the noisy seen clients; clean: test "
        "accuracy of every seen client; Δ: minus the baseline, paired by seed; C-score AUC of the "
        "global model)\n"
    )
    heads = ["memorized", "Δ memorized", "true", "clean test", "Δ clean", "C-score AUC"]
    print("| setting | seeds | predictor | " + " | ".join(heads) + " |")
    print("|---|---:|---|" + "---:|" * len(heads))
    for name, by_seed in settings.items():
        seeds = sorted(by_seed)
        for label in labels:
            f = {s: figures(by_seed[s], label) for s in seeds}
            b = {s: figures(base[s], label) for s in seeds if s in base}

            cells = [
                name,
                str(len(seeds)),
                any_result.name_of(label),
                _fmt([x["memorized"] for x in f.values()]),
                "-" if name == args.baseline else _paired(f, b, "memorized"),
                _fmt([x["true"] for x in f.values()]),
                _fmt([x["clean"] for x in f.values()]),
                "-" if name == args.baseline else _paired(f, b, "clean"),
                "-" if label != "global" else f"{np.mean([x['cscore'] for x in f.values()]):.3f}",
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
