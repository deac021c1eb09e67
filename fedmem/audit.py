"""``fedmem audit``: train a federation, its shadows and subsampled federations, and measure leakage.

An audit directory::

    <output_dir>/audit-<scenario>-<timestamp>/
        audit.toml              the audited scenario (its [audit] table says what was trained)
        target/                 the federation audited (canaries inserted), a run directory
        shadow-000/ ...         LiRA's shadow federations: each train example IN with p = 1/2
        subsample-000/ ...      federations on a random half of the seen clients
        leakage.csv             one row per predictor: accuracy and leakage, over seen clients
        per_client_leakage.csv  one row per client and predictor
        report.md, plots/*.png

Every federation runs in ONE session of the engine (as a sweep does), and each run directory
ends with ``scores.npz``: per-example loss, logit-scaled confidence and correctness of every
predictor of every client (the only thing clients send besides their usual replies).
Membership (which examples each shadow kept, which clients each subsample trained, which
canaries went where) is recomputed from the seed by :mod:`fedmem.data.membership`. The
tables and figures (:mod:`fedmem.reports.audit`, which ``fedmem report AUDIT_DIR`` calls too)
are written only once every federation is complete; ``--resume DIR`` reruns only the
federations that are not. This module builds and runs the federations; the directory's format
is :mod:`fedmem.reports.directories`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedmem.config import Config
from fedmem.errors import ConfigError, FedmemError
from fedmem.federation.sessions import session_for
from fedmem.jobs import Job, Monitor, Outcome, check_jobs, continued, preflight, run_jobs
from fedmem.reports.audit import Audit, analyze, write_outputs
from fedmem.reports.directories import (
    AUDIT_FILE,
    TARGET,
    audit_config,
    create_audit,
    is_scored,
    load_audit,
    member_dir,
)
from fedmem.results import STATUS_COMPLETE
from fedmem.simulation import Session

__all__ = ["audit_jobs", "run_audit"]


def audit_jobs(cfg: Config, root: Path) -> list[Job]:
    """The federations of an audit of ``cfg``: target, shadows, subsamples (each scored).

    Shadows and subsamples evaluate only after their last round; subsamples also skip the
    personalizers (only their global model is measured).
    """
    if cfg.audit.role:
        raise ConfigError(
            f"audit.role = {cfg.audit.role!r} is set by fedmem audit itself; leave it empty in the scenario"
        )
    once = max(1, cfg.rounds)
    jobs = [Job(audit_config(cfg, TARGET), member_dir(root, TARGET), score=True)]
    for m in range(cfg.audit.shadows):
        shadow = audit_config(cfg, "shadow", m).replace(eval_every=once)
        jobs.append(Job(shadow, member_dir(root, "shadow", m), score=True))
    for f in range(cfg.audit.subsamples):
        sub = audit_config(cfg, "subsample", f).replace(
            eval_every=once, eval=dataclasses.replace(cfg.eval, personalizers=())
        )
        jobs.append(Job(sub, member_dir(root, "subsample", f), score=True))
    return jobs


def run_audit(
    cfg: Config,
    *,
    resume: Path | None = None,
    monitor: Monitor | None = None,
    verbose: bool = False,
    session: Session | None = None,
) -> tuple[Path, Audit]:
    """Run (or resume) the audit of ``cfg``, write its tables and figures; return its directory and findings.

    Raises
    ------
    FedmemError
        If a federation fails: the audit directory keeps the complete ones (``--resume`` it)
        and has no tables.
    """
    if resume is not None:
        saved = load_audit(resume)
        if saved.to_toml() != cfg.to_toml():
            raise ConfigError(
                f"--resume {resume}: the scenario and --set options differ from the audit's "
                f"{AUDIT_FILE}; resume with the same ones"
            )
    for job in audit_jobs(cfg, Path(".")):  # configs, data and partitions checked before any output
        preflight(job.cfg)
    root = resume if resume is not None else create_audit(cfg)
    todo = []
    for job in audit_jobs(cfg, root):
        if job.path is not None and not is_scored(job.path):
            todo.append(continued(job) if job.path.exists() else job)
    outcomes: list[Outcome] = []
    if todo:
        checked = check_jobs(todo, preflighted=True)  # the resumed ones' checkpoints
        outcomes = run_jobs(checked, session or session_for(cfg, verbose=verbose), monitor)
    bad = [o for o in outcomes if o.status != STATUS_COMPLETE]
    if bad:
        o = bad[0]
        raise FedmemError(
            f"{len(bad)} of the audit's federations did not complete (first: {o.run.path.name}: "
            f"{o.error}); the complete ones are kept: fedmem audit ... --resume {root}"
        )
    found = analyze(root)
    write_outputs(root, found)
    return root, found
