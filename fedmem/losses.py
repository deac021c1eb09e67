"""Training losses (``strategy.loss``): cross-entropy and two losses robust to label noise.

Every function maps logits and integer targets to the mean loss, shaped like
``F.cross_entropy``'s arguments: images (N, C) logits and (N,) targets; text (N, C, L) logits
and (N, L) targets (the class axis is axis 1, the mean runs over examples and positions).
With p = softmax(logits) over the class axis, K classes and y the target:

``ce``
    Cross-entropy, -log p_y (``F.cross_entropy`` itself: the numbers of a run without the option).

``rll``
    The robust log loss (Kumar and Sastry, "Robust Loss Functions for Learning Multi-class
    Classifiers", IEEE SMC 2018), the symmetric loss with which Patel and Sastry,
    "Memorization in Deep Neural Networks: Does the Loss Function Matter?" (PAKDD 2021), show
    networks resist fitting random labels:

        RLL_alpha(p, y) = log((alpha + 1) / alpha) - log(alpha + p_y)
                          + 1 / (K - 1) * sum_{j != y} log(alpha + p_j),        alpha > 0.

    It is 0 when p is the one-hot vector of y and its sum over the K labels is the constant
    K log((alpha + 1) / alpha) whatever the logits (the symmetry that makes risk minimisation
    tolerant to uniform label noise). Smaller alpha weighs the true class more, like log loss.

``gce``
    The generalized cross-entropy (Zhang and Sabuncu, "Generalized Cross Entropy Loss for
    Training Deep Neural Networks with Noisy Labels", NeurIPS 2018), the negative Box-Cox
    transform of p_y:

        L_q(p, y) = (1 - p_y^q) / q,        0 < q <= 1;

    cross-entropy in the limit q -> 0 and the mean absolute error 1 - p_y (up to a factor 2) at
    q = 1. The paper's default is q = 0.7.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.nn import functional as F

from fedmem.config import LOSSES, StrategyConfig
from fedmem.errors import ConfigError
from fedmem.training import LossFn

__all__ = [
    "LOSSES",
    "LossFn",
    "cross_entropy",
    "generalized_cross_entropy",
    "loss_function",
    "robust_log_loss",
    "training_loss",
]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, -log p_y: exactly ``F.cross_entropy``."""
    return F.cross_entropy(logits, targets)


def robust_log_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Mean robust log loss RLL_alpha (Kumar and Sastry 2018; Patel and Sastry 2021); see the module.

    Parameters
    ----------
    logits:
        (N, C) or (N, C, *positions).
    targets:
        int64 (N,) or (N, *positions).
    alpha:
        > 0.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"the robust log loss needs at least 2 classes, got {num_classes}")
    log_terms = torch.log(alpha + torch.softmax(logits, dim=1))  # (N, C, *positions)
    own = log_terms.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N, *positions)
    others = log_terms.sum(dim=1) - own
    per_example = math.log((alpha + 1.0) / alpha) - own + others / (num_classes - 1)
    return per_example.mean()


def generalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Mean generalized cross-entropy (1 - p_y^q) / q (Zhang and Sabuncu 2018); see the module.

    ``p_y^q`` is computed as ``exp(q * log p_y)`` from the log-softmax, which stays finite and
    differentiable where p_y underflows.

    Parameters
    ----------
    logits:
        (N, C) or (N, C, *positions).
    targets:
        int64 (N,) or (N, *positions).
    q:
        In (0, 1].
    """
    log_p = torch.log_softmax(logits, dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)  # (N, *positions)
    # -expm1(q log p) = 1 - p^q without cancellation when q log p is small (q -> 0 tends to CE)
    return (-torch.expm1(q * log_p) / q).mean()


def loss_function(name: str, *, alpha: float = 0.1, q: float = 0.7) -> LossFn:
    """The loss ``name`` (one of :data:`LOSSES`) with its parameter bound.

    ``"ce"`` returns ``F.cross_entropy`` itself, so a run without the option is unchanged
    bit for bit. Raises :class:`~fedmem.errors.ConfigError` naming the valid choices.
    """
    if name == "ce":
        return F.cross_entropy
    if name == "rll":
        return partial(robust_log_loss, alpha=alpha)
    if name == "gce":
        return partial(generalized_cross_entropy, q=q)
    valid = ", ".join(repr(n) for n in LOSSES)
    raise ConfigError(f"strategy.loss = {name!r} is not known; valid choices: {valid}")


def training_loss(strategy: StrategyConfig) -> LossFn:
    """The run's training loss: ``strategy.loss`` with ``strategy.loss_alpha`` / ``strategy.loss_q``.

    The one place the choice is made; the training loop's default step and every strategy's own
    step call what this returns (through :meth:`fedmem.strategy.ClientContext.loss`).
    """
    return loss_function(strategy.loss, alpha=strategy.loss_alpha, q=strategy.loss_q)
