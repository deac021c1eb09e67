"""Personalization strategies, one module each, registered here explicitly.

A new strategy is one module plus one line below (and a test); a test checks
that every module in this package is registered and documented.
"""

from fedmem.config import Config
from fedmem.errors import ConfigError
from fedmem.registry import Registry
from fedmem.strategy import Strategy
from strategies.apfl import Apfl
from strategies.ditto import Ditto
from strategies.fedadam import FedAdam
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedbn import FedBN
from strategies.fedper import FedPer
from strategies.fedprox import FedProx
from strategies.fedrep import FedRep
from strategies.fedyogi import FedYogi
from strategies.finetune import FineTune
from strategies.ifca import Ifca
from strategies.knnper import KnnPer
from strategies.local import Local
from strategies.mrperfedavg import MRPerFedAvg
from strategies.perfedavg import PerFedAvg
from strategies.pfedme import PFedMe
from strategies.scaffold import Scaffold

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategy.name")
_ALL: tuple[type[Strategy], ...] = (
    Local,
    FedAvg,
    FineTune,
    KnnPer,
    FedProx,
    Scaffold,
    FedAvgM,
    FedAdam,
    FedYogi,
    Ditto,
    Apfl,
    PFedMe,
    FedPer,
    FedRep,
    FedBN,
    Ifca,
    PerFedAvg,
    MRPerFedAvg,
)
for _cls in _ALL:
    STRATEGIES.register(_cls.name, _cls)


def check_config(cfg: Config) -> None:
    """Check the strategy and personalizer names and parse their ``[strategy.<name>]`` tables.

    ``fedmem.config`` cannot do this (it must not import the strategies); the engine calls it
    before a run starts, and every client when it parses the shipped config. What needs the
    model or the population is checked once, before a run, by each strategy's ``check`` hook.
    """
    STRATEGIES.get(cfg.strategy.name)
    for name in cfg.eval.personalizers:
        if name not in STRATEGIES:
            raise ConfigError(
                f"eval.personalizers contains {name!r}, which is not a known strategy; "
                f"valid choices: {', '.join(STRATEGIES.names())}"
            )
    used = [cfg.strategy.name, *cfg.eval.personalizers]
    for table in cfg.strategy.params:
        # A scenario may hold the tables of strategies it is not running, so that
        # `--set strategy.name=...` switches between them; each is still checked, key by key.
        if table not in STRATEGIES:
            raise ConfigError(
                f"[strategy.{table}] names no known strategy; valid choices: {', '.join(STRATEGIES.names())}"
            )
        if table not in used:
            STRATEGIES.get(table).parse_params(cfg)
    for name in used:
        STRATEGIES.get(name)(cfg)  # parses its table
    check_options(cfg)


def check_options(cfg: Config) -> None:
    """Refuse coherent-gradient options that the run's strategy cannot honour.

    ``update.aggregate`` needs a strategy that averages uploads (not Local); ``strategy.gradient``
    a strategy whose local steps take a plain cross-entropy gradient (not APFL, pFedMe, Per-FedAvg
    or its meta-regularized variant). That ``winsorized`` and ``dpsgd`` also need a model with
    per-example gradients is checked with the model, before a run (``fedmem.simulation.preflight``).
    """
    run = STRATEGIES.get(cfg.strategy.name)
    if cfg.update.aggregate != "mean" and not run.averages_uploads:
        raise ConfigError(
            f"update.aggregate = {cfg.update.aggregate!r} needs a strategy that averages client uploads, "
            f"but {run.name} does not; use update.aggregate = 'mean'"
        )
    gradient = cfg.strategy.gradient
    if gradient != "mean" and not run.robust_gradients:
        raise ConfigError(
            f"strategy.gradient = {gradient!r} replaces the cross-entropy gradient of a plain local step, "
            f"but {run.name} brings a step of its own; use strategy.gradient = 'mean'"
        )
    if gradient == "dpsgd" and run.not_sample_private:
        raise ConfigError(
            f"strategy.gradient = 'dpsgd' cannot make {run.name}'s uploads private: "
            f"{run.not_sample_private}; use another strategy or strategy.gradient = 'mean'"
        )


__all__ = ["STRATEGIES", "check_config", "check_options"]
