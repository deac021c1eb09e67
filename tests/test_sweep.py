"""Sweeps: many federations in one session give exactly what separate runs give; CSVs, resume, report."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedmem.config import Config
from fedmem.errors import ConfigError
from fedmem.federation.sessions import run_on_engine
from fedmem.jobs import Job, Monitor
from fedmem.reports.directories import load_sweep
from fedmem.reports.runs import curve, render
from fedmem.reports.tables import PER_CLIENT_COLUMNS, RESULT_COLUMNS
from fedmem.simulation import Body, ClientFailure, InProcessExecutor, in_process_session
from fedmem.strategy import Update
from fedmem.sweep import SweepSpec, expand, parse_grid, run_sweep
from fedmem.updates import Arrays
from tests.conftest import TINY


def _spec(tmp_path: Path, **kw: Any) -> tuple[SweepSpec, list[str]]:
    spec = SweepSpec(
        "default",
        strategies=kw.get("strategies", ("fedavg", "ditto")),
        seeds=kw.get("seeds", (0, 1)),
        overrides=(*TINY, *kw.get("overrides", ())),
        grid=kw.get("grid", ()),
    )
    return spec, [f"runtime.output_dir='{tmp_path / 'runs'}'", "runtime.engine='inprocess'"]


def _strip(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "wall_seconds"}


def test_parse_grid_splits_values_but_not_lists() -> None:
    assert parse_grid("strategy.lr=0.01, 0.05") == ("strategy.lr", ("0.01", "0.05"))
    assert parse_grid("memory.k_grid=[3, 5],[10]") == ("memory.k_grid", ("[3, 5]", "[10]"))
    with pytest.raises(ConfigError, match="--grid expects KEY=V1,V2"):
        parse_grid("strategy.lr")
    with pytest.raises(ConfigError, match="--grid cannot vary seed: use --seeds"):
        parse_grid("seed=1,2")


def test_expand_is_the_product_with_names_and_validated_configs(tmp_path: Path) -> None:
    spec, extra = _spec(tmp_path, grid=(("strategy.lr", ("0.01", "0.05")),))
    feds = expand(spec, extra)
    assert [f.name for f in feds] == [
        f"{s}-s{seed}-lr={lr}" for s in ("fedavg", "ditto") for lr in ("0.01", "0.05") for seed in (0, 1)
    ]
    assert {(f.cfg.strategy.name, f.cfg.seed, f.cfg.strategy.lr) for f in feds} == {
        (s, seed, lr) for s in ("fedavg", "ditto") for seed in (0, 1) for lr in (0.01, 0.05)
    }
    with pytest.raises(ConfigError, match="strategy"):
        expand(SweepSpec("default", strategies=("fedavg", "nope"), overrides=tuple(TINY)), extra)


def test_a_sweep_gives_each_federation_exactly_its_separate_run(tmp_path: Path) -> None:
    spec, extra = _spec(tmp_path)
    sweep, feds, outcomes = run_sweep(spec, extra=extra)
    assert [o.status for o in outcomes] == ["complete"] * 4
    assert sorted(p.name for p in sweep.path.iterdir() if p.is_dir()) == sorted(f.name for f in feds)
    for fed, outcome in zip(feds, outcomes, strict=True):
        alone = run_on_engine(fed.cfg)
        assert _strip(outcome.run.summary()) == _strip(alone.summary())
        strip = [{k: v for k, v in m.items() if k != "seconds"} for m in alone.metrics()]
        assert [{k: v for k, v in m.items() if k != "seconds"} for m in outcome.run.metrics()] == strip

    results, _ = render(sweep.path)
    assert len(results) == 4
    table = pd.read_csv(sweep.path / "results.csv")
    assert list(table.columns) == RESULT_COLUMNS  # no grid: no extra columns
    ditto_knn = table[
        (table.federation == "ditto-s1")
        & (table.predictor == "knn")
        & (table.group == "seen")
        & (table.statistic == "mean")
    ]
    summary = json.loads((sweep.path / "ditto-s1" / "summary.json").read_text())
    assert ditto_knn.value.tolist() == [summary["accuracy"]["knn"]["mean"]]
    assert set(table.test_tuned[table.statistic.str.startswith("best_round")]) == {True}
    assert set(table.test_tuned[table.predictor.str.endswith("_oracle")]) == {True}
    assert set(table.test_tuned[table.statistic == "p10"][~table.predictor.str.endswith("_oracle")]) == {
        False
    }
    clients = pd.read_csv(sweep.path / "per_client.csv")
    assert list(clients.columns) == PER_CLIENT_COLUMNS
    assert len(clients) == 2 * 4 * 3 + 2 * 4 * 4  # 2 seeds x 4 clients x (fedavg: 3 predictors, ditto: 4)
    knn = clients[clients.predictor == "knn"]
    assert set(knn.knn_lambda) <= {0.0, 0.5, 1.0} and set(knn.knn_k) <= {3, 5}
    assert clients.label_entropy.between(0, 3.33).all()


def test_resume_runs_only_what_did_not_complete(tmp_path: Path) -> None:
    spec, extra = _spec(tmp_path, strategies=("fedavg",))
    feds = expand(spec, extra)

    class Interrupting(InProcessExecutor):
        def train(
            self, server_round: int, pids: Sequence[int], arrays: Arrays
        ) -> dict[int, Update | ClientFailure]:
            if self.cfg.seed == 1:
                raise KeyboardInterrupt
            return super().train(server_round, pids, arrays)

    def session(cfg: Config, num_nodes: int, body: Body) -> None:
        body(Interrupting)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, extra=extra, session=session)
    (path,) = (tmp_path / "runs").iterdir()
    done, missing = load_sweep(path)
    assert [r.name for r in done] == ["fedavg-s0"] and missing == [("fedavg-s1", "interrupted")]
    first = (path / "fedavg-s0" / "summary.json").read_text()

    started: list[str] = []

    class Seen(Monitor):
        def started(self, index: int, job: Job) -> None:
            started.append(job.path.name if job.path else "")

    with pytest.raises(ConfigError, match=r"cannot resume .*--seeds differs"):
        run_sweep(SweepSpec(spec.scenario, spec.strategies, (0, 2), spec.overrides), extra=extra, resume=path)
    _, _, outcomes = run_sweep(spec, extra=extra, resume=path, monitor=Seen())
    assert started == ["fedavg-s1"] and [o.status for o in outcomes] == ["complete"]
    assert (path / "fedavg-s0" / "summary.json").read_text() == first  # untouched
    assert [r.name for r in load_sweep(path)[0]] == [f.name for f in feds]


def test_report_plots_exist_decode_and_show_the_metrics(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    spec, extra = _spec(tmp_path, strategies=("fedavg", "ditto"), seeds=(0,), overrides=("rounds=3",))
    sweep, _, _ = run_sweep(spec, extra=extra)
    results, written = render(sweep.path)
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == ["accuracy_vs_round.png", "client_accuracy.png", "gain_vs_entropy.png", "knn_lambda.png"]
    for png in (p for p in written if p.suffix == ".png"):
        image = mpimg.imread(png)
        assert image.ndim == 3 and image.shape[1] > image.shape[0]
        assert image[..., :3].std() > 0.05  # not blank
    # the data behind the accuracy-vs-round figure is metrics.jsonl's
    ditto = next(r for r in results if r.strategy == "ditto")
    lines = [json.loads(x) for x in (sweep.path / "ditto-s0" / "metrics.jsonl").read_text().splitlines()]
    assert curve(ditto, "ditto") == [(m["round"], m["accuracy"]["ditto"]["mean"]) for m in lines]
    report = (sweep.path / "report.md").read_text()
    assert "![accuracy vs round](plots/accuracy_vs_round.png)" in report and "test-tuned" in report


def test_a_run_directory_gets_its_own_accuracy_plot(tiny_config: Callable[..., Config]) -> None:
    run = run_on_engine(tiny_config().with_runtime(engine="inprocess"))
    _, written = render(run.path)
    assert run.path / "accuracy_vs_round.png" in written
    assert (run.path / "report.md").read_text().count("| FedAvg |") == 3  # global, fine-tuned, kNN-Per


def test_in_process_session_hosts_federations_of_different_sizes(tmp_path: Path) -> None:
    spec, extra = _spec(
        tmp_path, strategies=("fedavg",), seeds=(0,), grid=(("partition.num_clients", ("3", "4")),)
    )
    seen: list[int] = []

    def session(cfg: Config, num_nodes: int, body: Body) -> None:
        seen.append(num_nodes)
        in_process_session(cfg, num_nodes, body)

    _, _, outcomes = run_sweep(spec, extra=extra, session=session)
    assert seen == [4] and [o.status for o in outcomes] == ["complete", "complete"]


def test_a_report_names_the_versions_and_tells_apart_federations_run_under_others() -> None:
    from fedmem.reports.directories import Result
    from fedmem.reports.runs import environment_lines

    def result(name: str, env: dict[str, str] | None) -> Result:
        return Result(name, "fedavg", 0, {}, {"environment": env} if env else {}, [])

    old = {"python": "3.11.7", "torch": "2.15.0+cpu"}
    new = {"python": "3.11.7", "torch": "2.14.1+cu130"}
    assert environment_lines([result("a", old), result("b", old)]) == [
        "Versions: python 3.11.7, torch 2.15.0+cpu.",
        "",
    ]
    lines = environment_lines([result("a", old), result("b", new), result("c", old), result("d", None)])
    assert lines[0].startswith("The federations ran under different versions")
    assert lines[2:] == [
        "- python 3.11.7, torch 2.15.0+cpu: a, c",
        "- python 3.11.7, torch 2.14.1+cu130: b",
        "- not recorded (an older run): d",
        "",
    ]
