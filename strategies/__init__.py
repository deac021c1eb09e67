"""Personalization strategies, one module each, registered here explicitly.

A new strategy is one module plus one line below (and a test); a test checks
that every module in this package is registered.
"""

from fedmem.registry import Registry
from fedmem.strategy import Strategy
from strategies.fedavg import FedAvg
from strategies.finetune import FineTune
from strategies.knnper import KnnPer
from strategies.local import Local

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategy.name")
for _cls in (Local, FedAvg, FineTune, KnnPer):
    STRATEGIES.register(_cls.name, _cls)

__all__ = ["STRATEGIES"]
