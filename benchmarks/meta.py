"""Meta-learning and task memorization: Per-FedAvg, its meta-regularized variants and the baselines
on ``permuted`` and ``permuted_marked`` (the study of docs/benchmarks.md).

Yin et al. ("Meta-Learning without Memorization", ICLR 2020): when the inputs say which task they
belong to (``permuted_marked``: a client marker on every image), MAML-style meta-learning can solve
every training client zero-shot and stop learning to adapt; the meta-regularizers (MR-W on the
weights, MR-A on the activations) restore adaptation. This script runs, with ``fedmem compare``:

1. **beta selection on validation clients**: MR-W and MR-A over ``--beta-w`` / ``--beta-a`` on
   ``permuted_marked`` with the validation seed (``--val-seed``, default 100). That federation's
   clients, permutations and images are drawn from another seed than every reported federation's,
   so its unseen clients are validation clients: beta is the one with the best mean accuracy of
   those clients after ``--select-steps`` local steps. The reported seeds' clients are never used.
2. **the study**, on both scenarios, seeds ``--seeds``: FedAvg (its global model, fine-tuned for
   k steps: FedAvg+FT), Per-FedAvg first-order and Hessian-free, MR-W and MR-A at the chosen betas;
   kNN-Per on each trained model.

It prints the selection table, the study table (final round, mean +- std over seeds of the mean
test accuracy over seen / unseen clients, before adaptation and after 1, 5 and 20 steps), the
gaps ``permuted_marked - permuted``, and writes ``adaptation_unseen.png`` / ``adaptation_seen.png``
(accuracy against local steps) into ``--out``. Sweeps already complete under ``--out`` are reused,
unfinished ones resumed, so an interrupted study continues where it stopped. Two sweeps run at a
time (``--jobs``), each a ``fedmem compare`` process with one torch thread.

Usage: ``python benchmarks/meta.py [--out runs/meta] [--seeds 0,1,2] [--set KEY=VALUE ...]``; the
``--set`` values apply to every federation (the figures in docs/benchmarks.md give theirs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmem.reports import run_figures
from fedmem.reports.directories import Result, load_sweep
from fedmem.results import RunDir

REGIMES = ("permuted", "permuted_marked")
STEPS = (0, 1, 5, 20)


@dataclass(frozen=True)
class Algorithm:
    """One row of the study: a strategy, its settings, and its predictor before / after k steps."""

    name: str
    tag: str  # its sweeps' folder names: <scenario>-<tag>
    strategy: str
    sets: tuple[str, ...]
    adapted: str  # "<adapted>@<k>" are its points; @0 is the deployed model as is

    def label(self, steps: int) -> str:
        return f"{self.adapted}@{steps}"


def _fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    a = 100 * np.asarray(values, np.float64)
    return f"{a.mean():.1f}" if len(a) == 1 else f"{a.mean():.1f} ± {a.std():.1f}"


def sweep(
    out: Path,
    tag: str,
    scenario: str,
    strategy: str,
    seeds: str,
    sets: Sequence[str],
    grid: Sequence[str] = (),
) -> list[Result]:
    """Run (or resume, or reuse) one ``fedmem compare`` sweep under ``out/tag``; its completed results.

    A federation that failed (diverged) is reported on stderr and left out, not retried: a
    resume would continue from its last checkpoint into the same failure.
    """
    parent = out / tag
    parent.mkdir(parents=True, exist_ok=True)
    found = [p for p in parent.iterdir() if (p / "sweep.toml").is_file()]
    args = [sys.executable, "-m", "fedmem.cli", "compare", scenario, "--strategies", strategy]
    args += ["--seeds", seeds, *(a for s in sets for a in ("--set", s))]
    args += [*(a for g in grid for a in ("--grid", g)), "--engine", "inprocess", "--out", str(parent)]
    if found:
        done, missing = load_sweep(found[0])
        if NO_RUN or all(status == "failed" for _, status in missing):
            return _report_failures(found[0], done, missing)
    if NO_RUN:
        return []
        args += ["--resume", str(found[0])]
    with open(parent / "compare.log", "a") as log:
        subprocess.run(args, check=False, stdout=log, stderr=subprocess.STDOUT)
    (path,) = [p for p in parent.iterdir() if (p / "sweep.toml").is_file()]
    done, missing = load_sweep(path)
    if any(status != "failed" for _, status in missing):
        raise SystemExit(
            f"{tag}: federations did not run to the end: {missing}; see {parent / 'compare.log'}"
        )
    return _report_failures(path, done, missing)


FAILED: dict[str, str] = {}  # federation path -> its status sentence, for the report
NO_RUN = False  # --no-run: report what the sweeps under --out hold, run nothing


def _report_failures(path: Path, done: list[Result], missing: Sequence[tuple[str, str]]) -> list[Result]:
    for name, status in missing:
        run = RunDir(path / name)
        error = str(run.status().get("error", status)) if (run.path / "status.json").is_file() else status
        FAILED[f"{path.parent.name}/{name}"] = error
        print(f"{path.parent.name}/{name} did not complete: {error}", file=sys.stderr)
    return done


def unseen_mean(result: Result, label: str) -> float:
    return float(result.summary["unseen_accuracy"][label]["mean"])


def select_beta(results: Sequence[Result], steps: int) -> tuple[str, list[tuple[str, float]]]:
    """The beta whose validation federation's unseen clients adapt best after ``steps`` steps."""
    scores = [
        (r.grid["strategy.mrperfedavg.beta_kl"], unseen_mean(r, f"mrperfedavg@{steps}")) for r in results
    ]
    return max(scores, key=lambda s: s[1])[0], scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/meta"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--val-seed", default="100")
    parser.add_argument("--beta-w", default="1e-3,1e-2,1e-1", help="MR-W beta_kl grid")
    parser.add_argument("--beta-a", default="1e-3,1e-2,1e-1", help="MR-A beta_kl grid")
    parser.add_argument("--select-steps", type=int, default=1)
    # the scenarios' beta 0.1 diverged within 50-80 rounds with the exact Hessian-vector product
    parser.add_argument("--hf-beta", default="0.05", help="Per-FedAvg HF's outer step size")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--no-run", action="store_true", help="only report what --out already holds")
    args = parser.parse_args()
    global NO_RUN
    NO_RUN = args.no_run
    common = [*args.sets, f"eval.adapt_steps={list(STEPS)}", "eval.personalizers=['finetune', 'knnper']"]
    mr = {"weights": ("MR-W", args.beta_w), "activations": ("MR-A", args.beta_a)}

    with ThreadPoolExecutor(args.jobs) as pool:
        val = {
            reg: pool.submit(
                sweep,
                args.out,
                f"val-{reg}",
                "permuted_marked",
                "mrperfedavg",
                args.val_seed,
                [*common, f"strategy.mrperfedavg.regularizer={reg!r}"],
                [f"strategy.mrperfedavg.beta_kl={betas}"],
            )
            for reg, (_, betas) in mr.items()
        }
        fixed = [
            Algorithm("FedAvg (+FT)", "fedavg", "fedavg", (), "finetune"),
            Algorithm("Per-FedAvg FO", "fo", "perfedavg", ("strategy.perfedavg.variant='fo'",), "perfedavg"),
            Algorithm(
                f"Per-FedAvg HF (beta {args.hf_beta})",
                f"hf-beta{args.hf_beta}",
                "perfedavg",
                ("strategy.perfedavg.variant='hf'", f"strategy.perfedavg.beta={args.hf_beta}"),
                "perfedavg",
            ),
        ]
        futures: dict[tuple[str, str], Future[list[Result]]] = {}

        def submit(algo: Algorithm) -> None:
            """Queue ``algo``'s sweep on each scenario."""
            for regime in REGIMES:
                futures[(algo.name, regime)] = pool.submit(
                    sweep,
                    args.out,
                    f"{regime}-{algo.tag}",
                    regime,
                    algo.strategy,
                    args.seeds,
                    [*common, *algo.sets],
                )

        for algo in fixed:
            submit(algo)
        chosen: dict[str, str] = {}
        print("## beta chosen on validation clients")
        print(
            f"(permuted_marked, seed {args.val_seed}: its unseen clients; mean accuracy after "
            f"{args.select_steps} local steps, final round)\n"
        )
        print("| variant | beta_kl | validation clients, % |\n|---|---:|---:|")
        for reg, future in val.items():
            best, scores = select_beta(future.result(), args.select_steps)
            chosen[reg] = best
            for beta, score in scores:
                print(f"| {mr[reg][0]} | {beta}{' (chosen)' if beta == best else ''} | {100 * score:.1f} |")
        algos = list(fixed)
        for reg, (short, _) in mr.items():
            algo = Algorithm(
                f"{short} (beta {chosen[reg]})",
                short.lower(),
                "mrperfedavg",
                (f"strategy.mrperfedavg.regularizer={reg!r}", f"strategy.mrperfedavg.beta_kl={chosen[reg]}"),
                "mrperfedavg",
            )
            algos.append(algo)
            submit(algo)
        results = {key: f.result() for key, f in futures.items()}

    report(algos, results, args)


def report(
    algos: Sequence[Algorithm], results: dict[tuple[str, str], list[Result]], args: argparse.Namespace
) -> None:
    """Print the study table and the paired gaps; draw the adaptation curves."""
    wanted = len(args.seeds.split(","))
    print(
        f"\n## study (final round; mean ± std over seeds {args.seeds} of the mean test accuracy "
        "over clients, %; `seeds`: federations that completed)\n"
    )
    heads = [f"{g} {'model' if k == 0 else f'{k} steps'}" for g in ("seen", "unseen") for k in STEPS]
    print("| scenario | algorithm | seeds | " + " | ".join(heads) + " | kNN-Per seen | kNN-Per unseen |")
    print("|---|---|---:|" + "---:|" * (len(heads) + 2))
    curves: dict[str, dict[str, list[list[tuple[int, float]]]]] = {"seen": {}, "unseen": {}}
    for regime in REGIMES:
        for algo in algos:
            runs = results[(algo.name, regime)]
            cells = []
            for group, key in (("seen", "accuracy"), ("unseen", "unseen_accuracy")):
                cells += [_fmt([r.summary[key][algo.label(k)]["mean"] for r in runs]) for k in STEPS]
                if len(runs) == wanted:
                    curves[group][f"{algo.name}, {regime}"] = [
                        [(k, r.summary[key][algo.label(k)]["mean"]) for k in STEPS] for r in runs
                    ]
            knn = [
                _fmt([r.summary[key]["knn"]["mean"] for r in runs]) for key in ("accuracy", "unseen_accuracy")
            ]
            print(f"| `{regime}` | {algo.name} | {len(runs)} of {wanted} | " + " | ".join(cells + knn) + " |")
    print(
        "\n## permuted_marked - permuted, unseen clients: paired by seed (same clients, permutations and "
        "images), mean ± std over the seeds both completed (points of mean accuracy; negative count)\n"
    )
    print("| algorithm | " + " | ".join("model" if k == 0 else f"{k} steps" for k in STEPS) + " |")
    print("|---|" + "---:|" * len(STEPS))
    for algo in algos:
        plain = {r.seed: r for r in results[(algo.name, REGIMES[0])]}
        marked = {r.seed: r for r in results[(algo.name, REGIMES[1])]}
        seeds = sorted(plain.keys() & marked.keys())
        if not seeds:
            continue
        cells = []
        for k in STEPS:
            label = algo.label(k)
            gaps = [
                marked[s].summary["unseen_accuracy"][label]["mean"]
                - plain[s].summary["unseen_accuracy"][label]["mean"]
                for s in seeds
            ]
            a = 100 * np.asarray(gaps)
            cells.append(f"{a.mean():+.1f} ± {a.std():.1f} ({int((a < 0).sum())} of {len(a)})")
        print(f"| {algo.name} | " + " | ".join(cells) + " |")
    if FAILED:
        print("\nfederations that did not complete:")
        for name, error in FAILED.items():
            print(f"- {name}: {error}")
    # two figures per client group, so that no line hides another: the baselines against
    # Per-FedAvg, and Per-FedAvg against its meta-regularized variants
    figures = {
        "": [a.name for a in algos if a.strategy != "mrperfedavg" and "HF" not in a.name],
        "_mr": [a.name for a in algos if a.strategy in ("perfedavg", "mrperfedavg") and "HF" not in a.name],
    }
    for group, series in curves.items():
        for suffix, names in figures.items():
            chosen = {line: v for line, v in series.items() if line.split(", ")[0] in names}
            if not chosen:
                continue
            path = run_figures.accuracy_vs_round(
                chosen,
                args.out / f"adaptation_{group}{suffix}.png",
                title=f"{group.capitalize()} clients: accuracy after k local steps (final round)",
                xlabel="local adaptation steps from the deployed model",
            )
            print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
