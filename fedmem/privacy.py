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

import dataclasses
import functools
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from fedmem.config import ACCOUNTANTS, CLIPPINGS, WEIGHTINGS, Config
from fedmem.errors import ConfigError, FederationError
from fedmem.seeding import rng
from fedmem.strategy import Reply, ServerContext, Strategy, Update, Uploads
from fedmem.updates import Arrays, clip_update, is_float

# how sample_epsilon's sampling relates to the loop's batches; reported beside the figure
SAMPLE_ACCOUNTING = "poisson approximation of shuffled batches"
CLIP = "clip"  # the server state's name of the adaptive clip norm: {"norm": 0-d float64}, broadcast

__all__ = [
    "ACCOUNTANTS",
    "CLIP",
    "CLIPPINGS",
    "SAMPLE_ACCOUNTING",
    "WEIGHTINGS",
    "ClientDP",
    "adapt_clip_norm",
    "check_accounting",
    "epsilon",
    "noisy_mean",
    "noisy_unclipped_fraction",
    "privatize",
    "sample_clients",
    "sample_epsilon",
    "sample_size",
    "unprotected",
    "update_noise_multiplier",
]


def sample_size(fraction: float, population: int) -> int:
    """Clients sampled each round: ``max(1, round(fraction * population))``, without replacement."""
    return max(1, round(fraction * population))


def sample_clients(seed: int, server_round: int, seen: Sequence[int], fraction: float) -> list[int]:
    """Partition ids sampled for a round, from the run's RNG keyed by the round (sorted).

    The mechanism the accountants assume: a fixed number of clients without replacement.
    """
    count = sample_size(fraction, len(seen))
    chosen = rng(seed, "sample", server_round).choice(np.asarray(seen), size=count, replace=False)
    return sorted(int(p) for p in chosen)


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


# --------------------------------------------------------------------------- the wrapper


def unprotected(uploads: Uploads, broadcast: Collection[str]) -> str:
    """Why client-level DP cannot protect a strategy's declared ``uploads`` ("" if it can).

    The mechanism clips each client's change from what it received and noises the mean over a
    fixed number of clients, so it protects only uploads that every client makes of the same
    names, each a name the server broadcasts. The strategy's own ``note`` words the reason
    where it gives one.
    """
    if not uploads.every_client:
        why = (
            "its clients do not all upload the same arrays, so the server's averages have "
            "data-dependent denominators"
        )
    else:
        outside = [n for n in uploads.names if n not in broadcast]
        if not outside:
            return ""
        why = (
            f"it uploads {outside[0]!r}, which the server does not broadcast, so the DP wrapper can "
            "neither clip nor noise it"
        )
    return uploads.note or why


def privatize(
    cfg: Config, replies: Sequence[Reply], sent: Arrays, sampled: int, server_round: int
) -> list[Reply]:
    """What the strategy aggregates: the replies, or under client-level DP only their noisy mean.

    With ``update.noise_multiplier > 0`` the strategy sees one reply (weight 1): the clipped
    updates' mean over the ``sampled`` clients plus N(0, (z C / sampled)^2) (``z`` adjusted for
    adaptive clipping's count query), drawn from ``rng(seed, "update-noise", round)``; its server
    step (FedAvg, a server optimizer, pFedMe's mixing) is then post-processing of what DP
    releases. Otherwise the replies, every weight 1 under ``update.weighting = "uniform"``.
    """
    u = cfg.update
    if u.noise_multiplier <= 0:
        if u.weighting == "uniform":
            return [dataclasses.replace(rep, num_examples=1) for rep in replies]
        return list(replies)
    z = u.noise_multiplier
    if u.clipping == "adaptive":
        z = update_noise_multiplier(z, u.count_noise_std)
    std = z * clip_norm(cfg, sent)
    mean = noisy_mean(
        [rep.arrays for rep in replies], sent, sampled, std, rng(cfg.seed, "update-noise", server_round)
    )
    return [Reply(-1, 1, mean, {})]


def clip_norm(cfg: Config, received: Arrays) -> float:
    """This round's clip norm: the server's adaptive one when it sends it, else ``update.clip_norm``."""
    if cfg.update.clipping == "adaptive" and CLIP in received:
        return float(received[CLIP]["norm"])
    return cfg.update.clip_norm


class ClientDP:
    """The ``[update]`` table around any strategy's server step (as Flower's ``DifferentialPrivacy*``
    strategies wrap any strategy): clip on the client, noise and adapt the clip on the server, account.

    With ``update.noise_multiplier = 0`` and ``update.clip_norm = 0`` it only applies
    ``update.weighting``. What it cannot protect it refuses in :meth:`check`, from the strategy's
    declared :class:`~fedmem.strategy.Uploads` and what the strategy broadcasts: safe by default,
    since a strategy's ``fit`` may upload nothing it does not declare (``fedmem.client`` checks).

    Parameters
    ----------
    cfg:
        The run's config (``[update]``, ``[strategy]``, the seed).
    strategy:
        The run's strategy, whose ``init`` and ``aggregate`` this wraps.
    """

    def __init__(self, cfg: Config, strategy: Strategy) -> None:
        self.cfg = cfg
        self.strategy = strategy

    def check(self, ctx: ServerContext) -> None:
        """Refuse, with one sentence, a configuration whose guarantee would not hold or mean anything."""
        u = self.cfg.update
        check_accounting(
            u.noise_multiplier,
            self.cfg.strategy.fraction_fit,
            ctx.num_training_clients,
            u.delta,
            u.accountant,
        )
        if u.noise_multiplier <= 0:
            return
        state = self.init(ctx)
        reason = unprotected(self.strategy.uploads(), self.strategy.broadcast(state, 1))
        if reason:
            raise ConfigError(
                f"update.noise_multiplier > 0 (client-level DP) cannot be used with strategy.name = "
                f"{self.cfg.strategy.name!r}: {reason}; use a strategy that averages its uploads (fedavg, "
                "fedprox, fedadam, ditto...) or update.noise_multiplier = 0"
            )

    def init(self, ctx: ServerContext) -> Arrays:
        """The strategy's initial state, plus adaptive clipping's clip norm (``update.clip_norm``)."""
        state = self.strategy.init(ctx.initial_weights(), ctx)
        if self.cfg.update.clipping != "adaptive":
            return state
        return {**state, CLIP: {"norm": np.array(self.cfg.update.clip_norm, np.float64)}}

    def clip(self, update: Update, received: Arrays) -> Update:
        """A client's upload clipped to this round's clip norm (unchanged without ``update.clip_norm``)."""
        if self.cfg.update.clip_norm <= 0:
            return update
        arrays, norm = clip_update(update.arrays, received, clip_norm(self.cfg, received))
        return Update(arrays, {**update.metrics, "update_norm": norm}, update.num_examples)

    def aggregate(
        self, state: Arrays, replies: Sequence[Reply], sent: Arrays, sampled: int, ctx: ServerContext
    ) -> tuple[Arrays, Mapping[str, float], dict[str, float]]:
        """The next state, the strategy's server metrics and this round's privacy figures.

        The strategy aggregates :func:`privatize`'s replies. The figures: ``clip_norm`` (the C
        clients used), with adaptive clipping ``unclipped_fraction`` (the noisy estimate b of
        Andrew et al., noise from ``rng(seed, "clip-count-noise", round)``) and the next state's
        clip norm, with noise ``epsilon`` spent so far.
        """
        u = self.cfg.update
        state, server_metrics = self.strategy.aggregate(
            state, privatize(self.cfg, replies, sent, sampled, ctx.round), ctx
        )
        out: dict[str, float] = {}
        if u.clip_norm > 0:
            out["clip_norm"] = clip_norm(self.cfg, sent)
        if u.clipping == "adaptive":
            b = noisy_unclipped_fraction(
                [rep.metrics["update_norm"] for rep in replies],
                out["clip_norm"],
                sampled,
                u.count_noise_std,
                rng(self.cfg.seed, "clip-count-noise", ctx.round),
            )
            new = adapt_clip_norm(out["clip_norm"], b, u.target_quantile, u.clip_lr)
            state = {**state, CLIP: {"norm": np.array(new, np.float64)}}
            out["unclipped_fraction"] = b
        if u.noise_multiplier > 0:
            out["epsilon"] = self.spent(ctx, ctx.round)
        return state, server_metrics, out

    def spent(self, ctx: ServerContext, rounds: int) -> float:
        """Epsilon at ``update.delta`` after ``rounds`` rounds of the run's client-level mechanism."""
        u = self.cfg.update
        population = ctx.num_training_clients
        sampled = sample_size(self.cfg.strategy.fraction_fit, population)
        return epsilon(u.noise_multiplier, sampled, population, rounds, u.delta, u.accountant)

    def sample_spent(self, ctx: ServerContext, train_sizes: Mapping[int, int], rounds: int) -> float:
        """The worst training client's DP-SGD epsilon at ``update.delta`` after ``rounds`` rounds.

        Per client: ``q = B / n`` (``train_sizes[pid]``) and the steps of one ``fit``
        (``Strategy.dp_steps``) times the rounds among the first ``rounds`` in which the server
        sampled it (the sample is a function of the seed and the round, so this is exact, not the
        every-round bound).
        """
        s = self.cfg.strategy
        picked = [set(sample_clients(ctx.seed, r, ctx.clients, s.fraction_fit)) for r in range(1, rounds + 1)]
        worst = 0.0
        for pid in ctx.clients:
            n = train_sizes[pid]
            if n == 0:
                continue
            steps = self.strategy.dp_steps(n) * sum(pid in p for p in picked)
            worst = max(
                worst, sample_epsilon(s.dp_noise, min(1.0, s.batch_size / n), steps, self.cfg.update.delta)
            )
        return worst

    def summary(self, ctx: ServerContext, train_sizes: Mapping[int, int]) -> dict[str, Any]:
        """The summary's privacy keys after the last round: none for a mechanism without noise."""
        out: dict[str, Any] = {}
        u, s = self.cfg.update, self.cfg.strategy
        if u.noise_multiplier > 0:  # without noise no guarantee is claimed: no keys (docs/privacy.md)
            out.update(epsilon=self.spent(ctx, self.cfg.rounds), delta=u.delta, accountant=u.accountant)
        if s.gradient == "dpsgd" and s.dp_noise > 0:
            out.update(
                sample_epsilon=self.sample_spent(ctx, train_sizes, self.cfg.rounds),
                sample_delta=u.delta,
                sample_accounting=SAMPLE_ACCOUNTING,
            )
        return out
