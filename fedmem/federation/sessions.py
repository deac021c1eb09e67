"""The engine a run asks for (``runtime.engine``): Flower's Ray simulation, or the in-process oracle."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from fedmem.config import Config
from fedmem.jobs import Monitor, run_scenario
from fedmem.results import RunDir
from fedmem.simulation import Session, in_process_session


def session_for(cfg: Config, *, verbose: bool = False, client_app: Any = None) -> Session:
    """The session of ``runtime.engine``: one that hosts every federation of a command."""
    if cfg.runtime.engine == "flower":
        from fedmem.federation.runner import flower_session  # flwr costs ~1.5 s to import

        return partial(flower_session, verbose=verbose, client_app=client_app)
    return in_process_session


def run_on_engine(
    cfg: Config,
    *,
    monitor: Monitor | None = None,
    verbose: bool = False,
    session: Session | None = None,
    resume: Path | None = None,
) -> RunDir:
    """:func:`fedmem.jobs.run_scenario` on the engine that ``cfg`` names (or ``session``).

    ``resume``: continue this unfinished run directory of ``cfg`` from its last checkpoint.
    """
    return run_scenario(cfg, session or session_for(cfg, verbose=verbose), monitor, resume)
