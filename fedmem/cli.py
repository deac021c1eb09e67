"""The ``fedmem`` command line."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmem.errors import FedmemError


def _console() -> Console:
    # Piped into a file or a log, a table must not be squeezed into rich's default 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=200)


def _fail(exc: FedmemError) -> None:
    # plain text, never wrapped: one sentence a user (or a script) can read whole
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="fedmem")
def main() -> None:
    """fedmem: simulate personalized federated learning and audit what it memorizes."""


_SET = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. strategy.lr=0.05.",
)
_ENGINE = click.option(
    "--engine", type=click.Choice(["flower", "inprocess"]), help="Shortcut for --set runtime.engine=..."
)
_OUT = click.option(
    "--out",
    "output_dir",
    type=click.Path(file_okay=False),
    help="Parent of the run, sweep or audit directory (runtime.output_dir).",
)
_VERBOSE = click.option("--verbose", is_flag=True, help="Show Flower's and Ray's logs.")


def _resume(what: str) -> Any:
    return click.option(
        "--resume",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help=f"Continue this {what} directory: federations that completed are skipped.",
    )


def _extra(engine: str | None, output_dir: str | None) -> list[str]:
    extra = []
    if engine:
        extra.append(f"runtime.engine={engine!r}")
    if output_dir:
        extra.append(f"runtime.output_dir={str(output_dir)!r}")
    return extra


def _check_output(output_dir: str, resume: Path | None) -> None:
    """Refuse the directory a command will write (the one it resumes, else runtime.output_dir) early.

    Before Ray starts or the data load, so a typo in ``--out`` costs nothing.
    """
    if resume is not None:
        reason = _unwritable(resume)
        if reason:
            raise FedmemError(f"--resume {str(resume)!r} cannot be written: {reason}")
        return
    reason = _unwritable(output_dir)
    if reason:
        raise FedmemError(
            f"runtime.output_dir = {output_dir!r} cannot be written: {reason}; "
            "pass a writable directory with --out"
        )


def _unwritable(directory: str | Path) -> str:
    """Why ``directory`` cannot be created or written ("" if it can).

    Probes the directory itself or, when it does not exist yet, its nearest existing ancestor, so
    that nothing is created for a run that stops at its preflight. Permissions do not tell (root
    writes through them; a read-only mount refuses root too): it makes and removes a temporary
    directory there.
    """
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".fedmem-probe-").cleanup()
    except OSError as exc:
        return f"{existing} does not accept new files ({exc.strerror or exc})"
    return ""


def _prestart(cfg: Any, verbose: bool) -> None:
    if cfg.runtime.engine == "flower":
        from fedmem.federation.runner import prestart

        prestart(cfg, verbose)


class _Bar:
    """A progress display: federations done / total (sweeps) and the current federation's rounds."""

    def __init__(self, console: Console, total: int, rounds: int, label: str) -> None:
        from fedmem.jobs import Monitor

        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self.feds = self.bar.add_task("federations", total=total, status="", visible=total > 1)
        self.rounds = self.bar.add_task(label, total=rounds, status="starting")
        bar, feds, rounds_task = self.bar, self.feds, self.rounds

        class _Monitor(Monitor):
            def started(self, index: int, job: Any) -> None:
                cfg = job.cfg
                name = job.path.name if job.path else f"{cfg.name} · {cfg.strategy.name}"
                bar.reset(rounds_task, total=cfg.rounds, description=f"{name} · rounds", status="starting")

            def round(self, server_round: int, record: Mapping[str, Any]) -> None:
                status = f"loss {record['train_loss']:.3f}" if "train_loss" in record else "initial model"
                acc = record.get("accuracy", {})
                if acc:
                    status += " · acc " + " ".join(f"{k} {100 * v['mean']:.1f}" for k, v in acc.items())
                bar.update(rounds_task, completed=server_round, status=status)

            def finished(self, index: int, outcome: Any) -> None:
                bar.advance(feds)
                done = int(bar.tasks[feds].completed)
                bar.update(feds, status=f"last: {outcome.run.path.name} {outcome.status}" + f" ({done} done)")

        self.monitor = _Monitor()


@main.command()
@click.argument("scenario", default="default")
@_SET
@_ENGINE
@_OUT
@_VERBOSE
def run(
    scenario: str, overrides: tuple[str, ...], engine: str | None, output_dir: str | None, verbose: bool
) -> None:
    """Run SCENARIO (a TOML file or a name in simulations/, default: default)."""
    from fedmem.config import load_config

    console = _console()
    try:
        cfg = load_config(scenario, [*overrides, *_extra(engine, output_dir)])
        _check_output(cfg.runtime.output_dir, None)
        _prestart(cfg, verbose)  # Ray starts while torch is imported and the data load
        from fedmem.jobs import check_jobs, scenario_job

        checked = check_jobs([scenario_job(cfg)])  # data and partition errors before any output
        _run_and_report(console, checked, verbose)
    except FedmemError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("interrupted: continue it with fedmem resume RUN_DIR", err=True)
        sys.exit(130)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_SET
@_ENGINE
@_VERBOSE
def resume(run_dir: Path, overrides: tuple[str, ...], engine: str | None, verbose: bool) -> None:
    """Continue the interrupted or failed run RUN_DIR from its last checkpoint.

    It ends with the metrics, final model and summary an uninterrupted run gives. Only
    runtime settings (--engine, --set runtime.*) may differ from the run's config.toml.
    """
    console = _console()
    try:
        from fedmem.jobs import run_config

        cfg = run_config(run_dir, [*overrides, *_extra(engine, None)])
        _check_output(cfg.runtime.output_dir, run_dir)
        _prestart(cfg, verbose)
        from fedmem.jobs import check_jobs, scenario_job

        checked = check_jobs([scenario_job(cfg, run_dir)])  # reads its checkpoint, once
        start = checked.resumes_after(0)
        console.print(f"resuming {run_dir} after round {start} of {cfg.rounds}", soft_wrap=True)
        _run_and_report(console, checked, verbose)
    except FedmemError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo(f"interrupted: continue with fedmem resume {run_dir}", err=True)
        sys.exit(130)


def _run_and_report(console: Console, checked: Any, verbose: bool) -> None:
    """Run one checked federation (new or resumed) under a progress bar, then print and render its results."""
    from fedmem.federation.sessions import session_for
    from fedmem.jobs import run_scenario
    from fedmem.reports.runs import render
    from fedmem.reports.tables import print_summary

    cfg = checked.jobs[0].cfg
    bar = _Bar(console, 1, cfg.rounds, f"{cfg.name} · {cfg.strategy.name} · rounds")
    with bar.bar:
        run_dir = run_scenario(checked, session_for(cfg, verbose=verbose), bar.monitor)
    print_summary(run_dir.summary(), console)
    render(run_dir.path)
    console.print(f"run directory: {run_dir.path}", soft_wrap=True)


def _csv(kind: type, text: str | None, option: str) -> tuple[Any, ...]:
    if not text:
        return ()
    try:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        raise FedmemError(f"{option} expects a comma-separated list, got {text!r}") from None


@main.command()
@click.argument("scenario", default="default")
@click.option("--strategies", help="Comma-separated strategy names (default: the scenario's).")
@click.option("--seeds", help="Comma-separated seeds (default: the scenario's seed).")
@_SET
@click.option(
    "--grid",
    multiple=True,
    metavar="KEY=V1,V2",
    help="Run every listed value of a config key, e.g. strategy.lr=0.01,0.05 (repeatable: a product).",
)
@_ENGINE
@_OUT
@_resume("sweep")
@_VERBOSE
def compare(
    scenario: str,
    strategies: str | None,
    seeds: str | None,
    overrides: tuple[str, ...],
    grid: tuple[str, ...],
    engine: str | None,
    output_dir: str | None,
    resume: Path | None,
    verbose: bool,
) -> None:
    """Run SCENARIO for every strategy x seed x grid value in one session; print and save the comparison."""
    from fedmem.reports.runs import render
    from fedmem.reports.tables import comparison_table
    from fedmem.sweep import SweepSpec, expand, parse_grid, run_sweep

    console = _console()
    try:
        spec = SweepSpec(
            scenario,
            _csv(str, strategies, "--strategies"),
            _csv(int, seeds, "--seeds"),
            overrides,
            tuple(parse_grid(g) for g in grid),
        )
        extra = _extra(engine, output_dir)
        feds = expand(spec, extra)
        _check_output(feds[0].cfg.runtime.output_dir, resume)
        _prestart(feds[0].cfg, verbose)
        bar = _Bar(console, len(feds), feds[0].cfg.rounds, "rounds")
        with bar.bar:
            sweep, _, outcomes = run_sweep(
                spec, feds, extra=extra, resume=resume, monitor=bar.monitor, verbose=verbose
            )
        for outcome in outcomes:
            if outcome.status != "complete":
                error = outcome.run.status().get("error")
                console.print(f"[red]{outcome.run.path.name}: {outcome.status}[/red]: {error}")
        results, _ = render(sweep.path)
        console.print(comparison_table(results, title=f"{feds[0].cfg.name}: {len(results)} federations"))
        console.print(
            f"sweep directory: {sweep.path}  (report.md, results.csv, per_client.csv, plots/)", soft_wrap=True
        )
    except FedmemError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("interrupted: resume with the same command and --resume SWEEP_DIR", err=True)
        sys.exit(130)


@main.command()
@click.argument("scenario", default="default")
@_SET
@_ENGINE
@_OUT
@_resume("audit")
@_VERBOSE
def audit(
    scenario: str,
    overrides: tuple[str, ...],
    engine: str | None,
    output_dir: str | None,
    resume: Path | None,
    verbose: bool,
) -> None:
    """Train SCENARIO, its shadows and subsampled federations ([audit]); print what each predictor leaks."""
    from fedmem.config import load_config

    console = _console()
    try:
        cfg = load_config(scenario, [*overrides, *_extra(engine, output_dir)])
        _check_output(cfg.runtime.output_dir, resume)
        _prestart(cfg, verbose)
        from fedmem.audit import audit_jobs, run_audit

        total = len(audit_jobs(cfg, Path(".")))
        bar = _Bar(console, total, cfg.rounds, "rounds")
        with bar.bar:
            root, found = run_audit(cfg, resume=resume, monitor=bar.monitor, verbose=verbose)
        console.print(_audit_table(found))
        console.print(
            f"audit directory: {root}  (leakage.csv, per_client_leakage.csv, report.md, plots/)",
            soft_wrap=True,
        )
    except FedmemError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("interrupted: continue with the same command and --resume AUDIT_DIR", err=True)
        sys.exit(130)


def _audit_table(found: Any) -> Any:
    from rich.table import Table

    from fedmem.reports.audit import table

    cfg = found.cfg
    header, body = table(found)
    shown = Table(title=f"leakage audit: {cfg.name} · {cfg.strategy.name} · seen clients, final round")
    for h in header:
        shown.add_column(h, justify="left" if h == "predictor" else "right")
    for row in body:
        shown.add_row(*row)
    return shown


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(path: Path) -> None:
    """Render the table, CSV files and plots of a run, sweep or audit directory again."""
    from fedmem.reports.directories import AUDIT_FILE, SWEEP_FILE
    from fedmem.reports.runs import render
    from fedmem.reports.tables import comparison_table, print_summary

    try:
        if (path / AUDIT_FILE).is_file():
            from fedmem.reports.audit import analyze, write_outputs

            found = analyze(path)
            write_outputs(path, found)
            _console().print(_audit_table(found))
            click.echo(f"wrote {path / 'leakage.csv'}, per_client_leakage.csv, report.md, plots/")
            return
        results, written = render(path)
        if (path / SWEEP_FILE).is_file():
            _console().print(comparison_table(results, title=path.name))
        else:
            print_summary(results[0].summary, _console())
        for p in written:
            click.echo(f"wrote {p}")
    except FedmemError as exc:
        _fail(exc)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def show(run_dir: Path) -> None:
    """Print the results table of a completed run."""
    from fedmem.reports.tables import print_summary
    from fedmem.results import RunDir

    try:
        print_summary(RunDir(run_dir).summary())
    except FedmemError as exc:
        _fail(exc)


@main.command()
def strategies() -> None:
    """List the strategies, one line each."""
    from strategies import STRATEGIES

    for name, cls in STRATEGIES.items():
        click.echo(f"{name:10s} {cls.summary}")


@main.command()
@click.option("--dataset", default="fashion_mnist", show_default=True)
@click.option("--root", default="data", show_default=True, help="Data directory (data.root).")
def data(dataset: str, root: str) -> None:
    """Find (or download) a data set and report where it was loaded from."""
    from fedmem.data.datasets import load_dataset
    from fedmem.data.text import TextCorpus

    try:
        ds = load_dataset(dataset, root)
    except FedmemError as exc:
        _fail(exc)
        return
    if isinstance(ds, TextCorpus):
        chars = sum(len(t) for t in ds.tokens)
        click.echo(f"{ds.name}: {len(ds.documents)} documents, {chars} characters, {ds.num_classes} symbols")
    else:
        click.echo(f"{ds.name}: {len(ds.y)} images {tuple(ds.x.shape[1:])}, {ds.num_classes} classes")


def entry() -> None:
    """The ``fedmem`` console script: :func:`main`, then an exit without the interpreter's teardown.

    Every file a command writes is complete (atomic renames, fsync) and Ray is stopped by then;
    unloading torch, flwr and Ray module by module would only add 1.2-1.4 s to every command.
    """
    import logging
    import os
    import traceback

    code = 0
    try:
        main()
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        runner = sys.modules.get("fedmem.federation.runner")
        if runner is not None:  # a Ray started early for a run that never came (os._exit skips atexit)
            runner.abandon()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    entry()
