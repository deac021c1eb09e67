"""Client-level differential privacy: the private mean of clipped updates, adaptive clipping, accounting.

DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018): every sampled client clips its update (what it uploads minus
what it received) to an L2 norm of at most ``C`` (``fedmem.updates.clip_update``); the server
releases only

    mean = received + (sum_i clipped update_i + N(0, (z C)^2 I)) / m,

with ``m`` the number of clients *sampled* (a fixed denominator: a client that failed counts as
a zero update), and the strategy's server step (averaging, a server optimizer) post-processes
that mean. Each client's contribution to the sum is bounded by ``C`` whatever its data, so the
round is a subsampled Gaussian mechanism on clients.

Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private Learning
with Adaptive Clipping", NeurIPS 2021, Algorithm 1): clients also report whether their update
was within ``C``; the server estimates the unclipped fraction with its own Gaussian noise,
``b = (sum_i 1[|update_i| <= C] + N(0, sigma_b^2)) / m``, and moves ``C`` geometrically toward
the target quantile ``gamma``: ``C <- C * exp(-eta_C (b - gamma))``. Releasing ``b`` costs
privacy too; the paper's Theorem 1 splits the requested noise multiplier ``z`` between the two
queries: the update gets ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, so that the pair is one
Gaussian mechanism of multiplier ``z``.

Accounting (``dp-accounting``, Google's maintained accountants): fedmem samples a fixed number
``m`` of the ``n`` training clients without replacement each round, so the neighbouring relation
is *replace one client* (``n`` is public) and the event is ``SampledWithoutReplacementDpEvent``
(Wang, Balle and Kasiviswanathan, AISTATS 2019, Theorem 27), which only the RDP accountant
supports. Replacing one client moves the sum of clipped updates by up to ``2C``; the RDP
accountant's noise multiplier is relative to that sensitivity (``z / 2``), the PLD accountant's
Gaussian under REPLACE_ONE shifts both distributions by its unit sensitivity (pass ``z``).

Sample-level DP-SGD (Abadi et al., CCS 2016; ``strategy.gradient = "dpsgd"``, the rule is in
:mod:`fedmem.training`) is accounted per client by :func:`sample_epsilon`: each local step is a
Gaussian mechanism of multiplier ``z`` on the sum of per-example gradients clipped to ``C``, on a
batch of ``B`` of the client's ``n`` examples. fedmem's loop draws batches by shuffling, not by
Poisson sampling; the event accounted is ``PoissonSampledDpEvent(B / n, GaussianDpEvent(z))`` under
add-or-remove-one-example, composed once per step: the common practice (Abadi et al. did the
same; so do Opacus and TF-Privacy with shuffled batches), an approximation whose exact value for
shuffling is not what is reported (:data:`SAMPLE_ACCOUNTING` says so in every summary).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from fedmem.config import ACCOUNTANTS, CLIPPINGS, WEIGHTINGS
from fedmem.errors import ConfigError, FederationError
from fedmem.updates import Arrays, is_float

# how sample_epsilon's sampling relates to the loop's batches; reported beside the figure
SAMPLE_ACCOUNTING = "poisson approximation of shuffled batches"
CLIP = "clip"  # the server state's name of the adaptive clip norm: {"norm": 0-d float64}, broadcast

__all__ = [
    "ACCOUNTANTS",
    "CLIP",
    "CLIPPINGS",
    "SAMPLE_ACCOUNTING",
    "WEIGHTINGS",
    "adapt_clip_norm",
    "check_accounting",
    "epsilon",
    "noisy_mean",
    "noisy_unclipped_fraction",
    "sample_epsilon",
    "sample_size",
    "steps_per_fit",
    "update_noise_multiplier",
]


def sample_size(fraction: float, population: int) -> int:
    """Clients sampled each round: ``max(1, round(fraction * population))``, without replacement."""
    return max(1, round(fraction * population))


@functools.lru_cache(maxsize=256)
def epsilon(
    noise_multiplier: float,
    sampled: int,
    population: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The epsilon at ``delta`` spent by ``rounds`` rounds of fedmem's client-level DP mechanism.

    Parameters
    ----------
    noise_multiplier:
        ``z``: the standard deviation of the noise on the sum of clipped updates over the clip
        norm (``update.noise_multiplier``; with adaptive clipping the total of both queries).
    sampled, population:
        ``m`` clients drawn uniformly without replacement from ``n`` each round.
    rounds:
        Rounds composed (0: nothing released, epsilon 0).
    delta:
        The target delta.
    accountant:
        ``"rdp"`` (Renyi DP; supports fixed-size sampling) or ``"pld"`` (privacy loss
        distributions, tighter; only without subsampling, ``sampled == population``).

    Returns
    -------
    float
        Epsilon under the replace-one-client relation; ``inf`` for ``noise_multiplier == 0``.
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"update.accountant = {accountant!r} is not known; valid choices: rdp, pld")
    if not 1 <= sampled <= population:
        raise ValueError(f"need 1 <= sampled <= population, got {sampled} of {population}")
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    # imported here: about a second of imports that clients, which never account, need not pay
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    if accountant == "rdp":
        # what composing the round `rounds` times gives (RDP adds up), without recomputing the
        # round's RDP curve (~150 ms) for every round's metrics
        orders, per_round = _round_rdp(noise_multiplier, sampled, population)
        return float(rdp_privacy_accountant.compute_epsilon(orders, rounds * per_round, delta)[0])
    if sampled < population:
        raise ConfigError(
            f"update.accountant = 'pld' cannot account for fedmem's client sampling ({sampled} of "
            f"{population} clients drawn without replacement each round: dp-accounting's PLD accountant "
            "has no sampled-without-replacement event); use update.accountant = 'rdp', or "
            "strategy.fraction_fit = 1 so that every training client takes part in every round"
        )
    # PLD's REPLACE_ONE Gaussian shifts both distributions by its sensitivity: z as given
    pld = pld_privacy_accountant.PLDAccountant(neighboring_relation=relation)
    pld.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
    return float(pld.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def _round_rdp(noise_multiplier: float, sampled: int, population: int) -> tuple[Sequence[float], np.ndarray]:
    """(orders, RDP at each order) of one round: ``sampled`` of ``population`` clients drawn without
    replacement, Gaussian noise ``noise_multiplier`` on the sum, replace-one neighbours."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    # sensitivity of the sum under replace-one is 2C: the RDP Gaussian is relative to it
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    round_event = dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian)
    rdp = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    rdp.compose(round_event)
    return rdp.orders, np.array(rdp.rdp, dtype=np.float64)


def steps_per_fit(examples: int, batch_size: int, epochs: int, steps: int) -> int:
    """Local steps of one ``fit`` on ``examples`` train examples: ``steps``, or ``epochs`` passes.

    The schedule of ``fedmem.training._batches``: ``steps > 0`` wins, else ``epochs * ceil(n / B)``.
    """
    if examples == 0:
        return 0
    return steps if steps > 0 else epochs * math.ceil(examples / batch_size)


@functools.lru_cache(maxsize=1024)
def sample_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The epsilon at ``delta`` of ``steps`` DP-SGD steps (Abadi et al., CCS 2016) on one client's data.

    Parameters
    ----------
    noise_multiplier:
        ``z`` (``strategy.dp_noise``): noise std over the per-example clip norm.
    sampling_rate:
        ``q = B / n``, batch size over the client's train examples (capped at 1).
    steps:
        Noisy steps composed (0: nothing released, epsilon 0).
    delta:
        The target delta.

    Returns
    -------
    float
        Epsilon of ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` composed ``steps`` times by
        dp-accounting's RDP accountant under add-or-remove-one-example: the Poisson approximation
        of fedmem's shuffled batches (:data:`SAMPLE_ACCOUNTING`). ``inf`` for ``z == 0``.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"need 0 < sampling_rate <= 1, got {sampling_rate}")
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    step = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    rdp = rdp_privacy_accountant.RdpAccountant()  # ADD_OR_REMOVE_ONE: Poisson's relation
    rdp.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return float(rdp.get_epsilon(delta))


def check_accounting(
    noise_multiplier: float, fraction: float, population: int, delta: float, accountant: str
) -> None:
    """Refuse, with one sentence, a DP configuration whose epsilon would not mean anything.

    ``delta`` must be below ``1 / population``: a mechanism that publishes one client's data
    outright, chosen at random, satisfies (0, 1/n)-DP. The accountant must support the sampling
    (checked by accounting one round).
    """
    if noise_multiplier <= 0:
        return
    if delta >= 1 / population:
        raise ConfigError(
            f"update.delta = {delta:g} must be below 1 / (training clients) = 1/{population}: with "
            "delta >= 1/n, publishing one client's data outright would meet the guarantee; lower update.delta"
        )
    epsilon(noise_multiplier, sample_size(fraction, population), population, 1, delta, accountant)


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Andrew et al.'s noise multiplier for the update when the clipped count takes its share.

    ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (NeurIPS 2021, Theorem 1): the update
    (sensitivity ``C``) with ``z_delta`` and the count (sensitivity 1/2) with ``sigma_b`` together
    are one Gaussian mechanism of multiplier ``z``. Needs ``2 sigma_b > z``.
    """
    if count_noise_std * 2 <= noise_multiplier:
        raise ConfigError(
            f"update.count_noise_std = {count_noise_std} must be more than update.noise_multiplier / 2 = "
            f"{noise_multiplier / 2:g}: the clipped count's noise alone would spend the whole privacy "
            "budget (Andrew et al. suggest about expected clients per round / 20)"
        )
    return float((noise_multiplier**-2 - (2 * count_noise_std) ** -2) ** -0.5)


def noisy_unclipped_fraction(
    norms: Sequence[float], clip_norm: float, sampled: int, count_noise_std: float, rng: np.random.Generator
) -> float:
    """``b = (#{i: norm_i <= C} + (sampled - len(norms)) + N(0, sigma_b^2)) / sampled``.

    ``norms`` are the replies' update norms before clipping; a sampled client that did not reply
    counts as a zero update, which is within ``C``. The draw comes from ``rng`` whatever sigma_b.
    """
    below = sum(1 for n in norms if n <= clip_norm) + (sampled - len(norms))
    return float((below + rng.normal(0.0, 1.0) * count_noise_std) / sampled)


def adapt_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """The geometric update ``C * exp(-lr * (b - gamma))`` of Andrew et al. (2021), Algorithm 1."""
    return float(clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile)))


def noisy_mean(
    uploads: Sequence[Arrays], received: Arrays, sampled: int, sum_std: float, rng: np.random.Generator
) -> Arrays:
    """The fixed-denominator mean of clients' updates plus Gaussian noise, as one upload.

    ``received + (sum_i (upload_i - received) + N(0, sum_std^2 I)) / sampled`` on every floating
    key the clients uploaded (float64, cast back to the received dtype); ``sampled - len(uploads)``
    clients that did not reply count as zero updates. Integer buffers (BatchNorm's counters) keep
    the received value: a client's count of batches would tell its data size. Noise is drawn
    name by name and key by key in sorted order.

    Every client must upload the same names and keys, each a name it received: anything else
    (SCAFFOLD's control deltas) is neither clipped nor covered by the noise.
    """
    if not uploads:
        return {}
    layout = {name: sorted(w) for name, w in uploads[0].items()}
    for arrays in uploads:
        if {n: sorted(w) for n, w in arrays.items()} != layout:
            raise FederationError(
                "under client-level DP every client must upload the same arrays; the replies differ"
            )
    outside = sorted(set(layout) - set(received))
    if outside:
        raise FederationError(
            f"under client-level DP every uploaded array must update one the client received; "
            f"{outside[0]!r} was not broadcast, so it is neither clipped nor noised"
        )
    out: Arrays = {}
    for name in sorted(layout):
        out[name] = {}
        for key in layout[name]:
            base = received[name][key]
            if not is_float(base):
                out[name][key] = base.copy()
                continue
            total = np.zeros(base.shape, np.float64)
            for arrays in uploads:
                total += arrays[name][key].astype(np.float64) - base.astype(np.float64)
            total += rng.normal(0.0, sum_std, base.shape)
            out[name][key] = (base.astype(np.float64) + total / sampled).astype(base.dtype)
    return out
