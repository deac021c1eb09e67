"""The ``fedmem`` command line."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedmem.errors import FedmemError


def _fail(exc: FedmemError) -> None:
    # plain text, never wrapped: one sentence a user (or a script) can read whole
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(package_name="fedmem")
def main() -> None:
    """fedmem: simulate personalized federated learning and audit what it memorizes."""


@main.command()
@click.argument("scenario", default="default")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. strategy.lr=0.05.",
)
@click.option(
    "--engine", type=click.Choice(["flower", "inprocess"]), help="Shortcut for --set runtime.engine=..."
)
@click.option(
    "--out",
    "output_dir",
    type=click.Path(file_okay=False),
    help="Parent of the run directory (runtime.output_dir).",
)
@click.option("--verbose", is_flag=True, help="Show Flower's and Ray's logs.")
def run(
    scenario: str, overrides: tuple[str, ...], engine: str | None, output_dir: str | None, verbose: bool
) -> None:
    """Run SCENARIO (a TOML file or a name in simulations/, default: default)."""
    from fedmem.config import load_config
    from fedmem.report import print_summary
    from fedmem.simulation import preflight, run_scenario

    extra = [*overrides]
    if engine:
        extra.append(f"runtime.engine={engine!r}")
    if output_dir:
        extra.append(f"runtime.output_dir={str(output_dir)!r}")
    console = Console()
    try:
        cfg = load_config(scenario, extra)
        preflight(cfg)  # data and partition errors before any output (cached for the run)
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        task = bar.add_task(f"{cfg.name} · {cfg.strategy.name} · rounds", total=cfg.rounds, status="starting")

        def progress(r: int, record: Mapping[str, Any]) -> None:
            status = f"loss {record['train_loss']:.3f}"
            acc = record.get("accuracy", {})
            if acc:
                status += " · acc " + " ".join(f"{k} {100 * v['mean']:.1f}" for k, v in acc.items())
            bar.update(task, completed=r, status=status)

        with bar:
            run_dir = run_scenario(cfg, progress=progress, verbose=verbose)
        print_summary(run_dir.summary(), console)
        console.print(f"run directory: {run_dir.path}", soft_wrap=True)
    except FedmemError as exc:
        _fail(exc)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def show(run_dir: Path) -> None:
    """Print the results table of a completed run."""
    from fedmem.report import print_summary
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

    try:
        ds = load_dataset(dataset, root)
    except FedmemError as exc:
        _fail(exc)
        return
    click.echo(f"{ds.name}: {len(ds.y)} images {tuple(ds.x.shape[1:])}, {ds.num_classes} classes")


if __name__ == "__main__":
    main()
