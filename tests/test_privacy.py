"""Client-level DP: clipping bound, exact no-op, seeded noise, accounting oracle, adaptive clipping."""

from __future__ import annotations

import math
from collections.abc import Callable

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmem.config import Config
from fedmem.errors import ConfigError, FederationError
from fedmem.jobs import preflight, run_scenario
from fedmem.models import Backbone
from fedmem.privacy import (
    adapt_clip_norm,
    epsilon,
    noisy_mean,
    noisy_unclipped_fraction,
    privatize,
    update_noise_multiplier,
)
from fedmem.seeding import rng
from fedmem.simulation import in_process_session
from fedmem.strategy import MODEL, ClientContext, Reply, ServerContext, Strategy, Update, Uploads
from fedmem.updates import Arrays, Weights, clip_update, global_norm, subtract
from strategies import STRATEGIES, check_config
from strategies.fedavg import FedAvg

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
DP = ["update.clip_norm=0.5", "update.noise_multiplier=1.0", "update.weighting='uniform'"]


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


# --------------------------------------------------------------------------- clipping


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=40),
    base=st.lists(st.floats(-10, 10), min_size=40, max_size=40),
    max_norm=st.floats(1e-3, 1e3),
)
def test_a_clipped_update_never_exceeds_the_clip_norm(
    values: list[float], base: list[float], max_norm: float
) -> None:
    half = len(values) // 2  # two keys under two names: the norm is taken jointly
    received = {"model": {"a": np.array(base[:half])}, "extra": {"b": np.array(base[half : len(values)])}}
    uploaded = {"model": {"a": np.array(values[:half])}, "extra": {"b": np.array(values[half:])}}
    out, norm = clip_update(uploaded, received, max_norm)
    after = global_norm([subtract(out[n], received[n]) for n in out])
    assert after <= max_norm * (1 + 1e-9)  # float64 rounding of received + scale * update, nothing more
    assert norm == pytest.approx(global_norm([subtract(uploaded[n], received[n]) for n in uploaded]))
    if norm <= max_norm:  # within the bound: bit for bit what the client uploaded
        assert all(np.array_equal(out[n][k], uploaded[n][k]) for n in out for k in out[n])
    else:  # clipped exactly onto the sphere
        assert after == pytest.approx(max_norm, rel=1e-9)


def test_no_noise_and_an_infinite_clip_norm_give_exactly_the_unprotected_run(
    tiny_config: Callable[..., Config],
) -> None:
    base = ["runtime.engine=inprocess", "eval_every=2"]
    plain = run_scenario(tiny_config(*base), in_process_session)
    clipped = run_scenario(tiny_config(*base, "update.clip_norm=1e300"), in_process_session)
    a, b = plain.summary(), clipped.summary()
    assert a["accuracy"] == b["accuracy"] and a["unseen_accuracy"] == b["unseen_accuracy"]
    assert "epsilon" not in b  # no noise: no guarantee is claimed
    losses = [[m["train_loss"] for m in run.metrics()] for run in (plain, clipped)]
    assert losses[0] == losses[1]
    assert [m["clip_norm"] for m in clipped.metrics()] == [1e300, 1e300]


# --------------------------------------------------------------------------- the noisy mean


def test_the_noisy_mean_without_noise_is_the_fixed_denominator_mean_by_hand() -> None:
    received = {"model": {"w": _f32(1, 1), "n": np.array(7)}}
    uploads = [
        {"model": {"w": _f32(2, 3), "n": np.array(40)}},  # update (1, 2)
        {"model": {"w": _f32(0, 1), "n": np.array(90)}},  # update (-1, 0)
    ]
    # 4 sampled, 2 replied: the missing two count as zero updates -> 1 + (0, 2) / 4
    out = noisy_mean(uploads, received, 4, 0.0, rng(0, "update-noise", 1))
    np.testing.assert_array_equal(out["model"]["w"], _f32(1.0, 1.5))
    assert out["model"]["w"].dtype == np.float32
    assert out["model"]["n"] == 7  # a client's batch counter would tell its data size: the received one


def test_the_noise_is_keyed_by_seed_and_round_and_has_the_fixed_denominator_scale() -> None:
    received = {"model": {"w": np.zeros(100_000, np.float32)}}
    uploads = [received] * 3

    def draw(seed: int, r: int) -> np.ndarray:
        return noisy_mean(uploads, received, 4, 2.0, rng(seed, "update-noise", r))["model"]["w"]

    first = draw(0, 1)
    np.testing.assert_array_equal(first, draw(0, 1))
    assert not np.array_equal(first, draw(0, 2)) and not np.array_equal(first, draw(1, 1))
    assert np.std(first) == pytest.approx(2.0 / 4, rel=0.02)  # sum_std / sampled, not / replies


def test_the_strategy_aggregates_only_the_noisy_mean(tiny_config: Callable[..., Config]) -> None:

    cfg = tiny_config(*DP)
    sent = {"model": {"w": _f32(0, 0)}}
    replies = [Reply(p, 10 * (p + 1), {"model": {"w": _f32(p, p)}}, {}) for p in range(3)]
    (one,) = privatize(cfg, replies, sent, 3, 1)
    noise = rng(cfg.seed, "update-noise", 1).normal(0.0, 1.0 * 0.5, 2)  # z * C on the sum
    np.testing.assert_allclose(one.arrays["model"]["w"], (np.array([3.0, 3.0]) + noise) / 3, rtol=1e-6)
    assert one.num_examples == 1
    uniform = privatize(tiny_config("update.weighting='uniform'"), replies, sent, 3, 1)
    assert [r.num_examples for r in uniform] == [1, 1, 1]
    with pytest.raises(FederationError, match="'c_delta' was not broadcast"):
        privatize(cfg, [Reply(0, 1, {"model": {"w": _f32(1, 1)}, "c_delta": {"w": _f32(1)}}, {})], sent, 3, 1)


# --------------------------------------------------------------------------- accounting


def _rdp_direct(z: float, m: int, n: int, rounds: int, delta: float) -> float:
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(z / 2)  # replace-one moves the sum by 2C
    event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, gaussian)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(delta))


def test_epsilon_is_the_accountants_value_for_hand_chosen_parameters() -> None:
    assert epsilon(1.1, 16, 80, 5, 1e-5) == _rdp_direct(1.1, 16, 80, 5, 1e-5)
    pld = pld_privacy_accountant.PLDAccountant(neighboring_relation=REPLACE_ONE)
    pld.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 10))
    assert epsilon(2.0, 40, 40, 10, 1e-6, "pld") == float(pld.get_epsilon(1e-6))
    # the two accountants' conventions agree: PLD(z) is the tighter bound, within 10 % of RDP(z / 2)
    rdp, pld_eps = epsilon(2.0, 40, 40, 10, 1e-6), epsilon(2.0, 40, 40, 10, 1e-6, "pld")
    assert 0.9 * rdp < pld_eps <= rdp
    assert epsilon(1.0, 16, 80, 0, 1e-5) == 0.0 and epsilon(0.0, 16, 80, 3, 1e-5) == math.inf


def test_the_summary_reports_the_accountants_epsilon(tiny_config: Callable[..., Config]) -> None:
    run = run_scenario(tiny_config(*DP, "runtime.engine=inprocess", "eval_every=2"), in_process_session)
    summary = run.summary()
    # 3 seen clients, all sampled (fraction_fit 1), 2 rounds
    assert summary["epsilon"] == _rdp_direct(1.0, 3, 3, 2, 1e-5)
    assert (summary["delta"], summary["accountant"]) == (1e-5, "rdp")
    per_round = [m["epsilon"] for m in run.metrics()]
    assert per_round == [_rdp_direct(1.0, 3, 3, 1, 1e-5), summary["epsilon"]]


def test_epsilon_grows_with_rounds_and_sampling_and_falls_with_noise() -> None:
    by_rounds = [epsilon(1.0, 10, 100, t, 1e-5) for t in (1, 2, 5, 20, 100)]
    by_noise = [epsilon(z, 10, 100, 20, 1e-5) for z in (0.5, 0.8, 1.0, 2.0, 5.0)]
    by_sample = [epsilon(1.0, m, 100, 20, 1e-5) for m in (1, 5, 10, 50, 100)]
    assert by_rounds == sorted(set(by_rounds))
    assert by_noise == sorted(set(by_noise), reverse=True)
    assert by_sample == sorted(set(by_sample))
    assert epsilon(1.0, 10, 100, 20, 1e-7) > epsilon(1.0, 10, 100, 20, 1e-5)  # smaller delta, larger epsilon


# --------------------------------------------------------------------------- adaptive clipping


def test_adaptive_clipping_by_hand_without_count_noise() -> None:
    norms = [0.5, 1.0, 2.0, 3.0]
    quiet = rng(0, "clip-count-noise", 1)
    assert noisy_unclipped_fraction(norms, 1.0, 4, 0.0, quiet) == 0.5  # 0.5 and 1.0 are within C
    assert noisy_unclipped_fraction(norms, 1.0, 5, 0.0, quiet) == 0.6  # the failed fifth: a zero update
    assert adapt_clip_norm(1.0, 0.5, 0.5, 0.2) == 1.0  # at the target quantile C stays
    assert adapt_clip_norm(2.5, 0.75, 0.5, 0.2) == pytest.approx(2.5 * math.exp(-0.05), abs=0, rel=1e-15)
    assert adapt_clip_norm(2.5, 0.25, 0.5, 0.2) == pytest.approx(2.5 * math.exp(0.05), abs=0, rel=1e-15)


def test_adaptive_clipping_moves_the_clip_norm_to_the_target_quantile() -> None:
    norms = [float(v) for v in range(1, 11)]  # the median lies between 5 and 6
    c, trace = 1.0, []
    for r in range(300):
        b = noisy_unclipped_fraction(norms, c, 10, 0.0, rng(0, "clip-count-noise", r))
        c = adapt_clip_norm(c, b, 0.5, 0.2)
        trace.append(c)
    assert trace[:40] == sorted(trace[:40])  # from below it only grows...
    assert 5.0 <= c < 6.0 and trace[-1] == trace[-100]  # ...and stops where half the norms are within C
    c = 50.0
    for r in range(300):
        c = adapt_clip_norm(c, noisy_unclipped_fraction(norms, c, 10, 0.0, rng(0, "x", r)), 0.9, 0.2)
    assert 9.0 <= c < 10.0  # the 90th percentile, approached from above


def test_the_update_noise_leaves_the_total_multiplier_as_requested() -> None:
    z_update = update_noise_multiplier(1.0, 1.0)
    assert z_update == pytest.approx((1 - 0.25) ** -0.5)
    # Andrew et al., Theorem 1: the two Gaussian queries compose to one of multiplier z
    for z, sigma_b in ((1.0, 1.0), (0.7, 2.5), (2.0, 1.01)):
        assert update_noise_multiplier(z, sigma_b) ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)


def test_adaptive_clipping_runs_and_logs_its_clip_norm(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(
        *DP,
        "update.clipping='adaptive'",
        "update.count_noise_std=0.0",
        "update.noise_multiplier=0.0",
        "update.clip_norm=0.01",  # far below one epoch's update: every client is clipped, C grows
        "runtime.engine=inprocess",
        "eval_every=2",
    )
    metrics = run_scenario(cfg, in_process_session).metrics()
    assert [m["unclipped_fraction"] for m in metrics] == [0.0, 0.0]
    assert [m["clip_norm"] for m in metrics] == [0.01, pytest.approx(0.01 * math.exp(0.2 * 0.5))]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (["update.weighting='examples'"], "needs update.weighting = 'uniform'"),
        (["update.weighting='median'"], "update.weighting = 'median' is not known; valid choices"),
        (["update.accountant='gdp'"], "update.accountant = 'gdp' is not known; valid choices: 'rdp', 'pld'"),
        (["update.clipping='adaptive'", "update.count_noise_std=0.4"], "must be more than update.noise"),
        (["update.delta=0.5"], "must be below 1 / (training clients) = 1/3"),
        (["update.delta=1.0"], "update.delta must be in (0, 1)"),
        (["update.accountant='pld'", "strategy.fraction_fit=0.5"], "'pld' cannot account for"),
        (["strategy.name=scaffold"], "strategy.name = 'scaffold': SCAFFOLD clients upload"),
        (["strategy.name=ifca"], "cannot be used with strategy.name = 'ifca': IFCA clients each upload"),
    ],
)
def test_refused_configurations_say_why_in_one_sentence(
    tiny_config: Callable[..., Config], overrides: list[str], phrase: str
) -> None:
    with pytest.raises(ConfigError) as info:
        preflight(tiny_config(*DP, *overrides))
    message = str(info.value)
    assert phrase in message and "\n" not in message


def test_allowed_configurations_pass(tiny_config: Callable[..., Config]) -> None:
    preflight(tiny_config(*DP, "update.accountant='pld'"))  # every training client takes part
    for strategy in ("fedadam", "ditto", "fedper", "pfedme"):  # server steps post-process the noisy mean
        check_config(tiny_config(*DP, f"strategy.name={strategy}"))


# --------------------------------------------------------------------------- reporting


def test_tables_show_epsilon_beside_the_accuracy() -> None:
    from rich.console import Console

    from fedmem.reports.directories import Result
    from fedmem.reports.tables import comparison_markdown, summary_table

    stats = {"mean": 0.5, "weighted_mean": 0.5, "p10": 0.25, "clients": 3}
    plain = {"strategy": "fedavg", "accuracy": {"global": stats}, "predictors": ["global"], "rounds": 2}
    private = {**plain, "epsilon": 3.14159, "delta": 1e-5, "accountant": "rdp"}
    console = Console(width=200, record=True)
    console.print(summary_table(private))
    assert "ε 3.14 at δ 1e-05 (rdp)" in console.export_text()
    console.print(summary_table(plain))
    assert console.export_text().count("ε 3.14") == 0  # export_text cleared the first table
    results = [
        Result("a", "fedavg", 0, {"update.noise_multiplier": "1.0"}, private, []),
        Result("b", "fedavg", 0, {"update.noise_multiplier": "0.0"}, plain, []),
    ]
    table = comparison_markdown(results).splitlines()
    assert "| ε |" in table[0]
    assert "| 3.14 |" in table[2] and "| inf |" in table[3]
    assert "ε" not in comparison_markdown(results[1:]).splitlines()[0]  # nobody private: no column


# --------------------------------------------------------------------------- safe by default


def _new_strategy(monkeypatch: pytest.MonkeyPatch, cls: type[Strategy]) -> None:
    """Register ``cls`` (a strategy a user just wrote) for this test only."""
    monkeypatch.setitem(STRATEGIES._items, cls.name, cls)


class _Extra(FedAvg):
    """A new strategy whose clients also upload an array the server never broadcasts; no flag set."""

    name = "extra_upload"

    def uploads(self) -> Uploads:
        return Uploads((MODEL, "extra"))

    def fit(self, model: Backbone, ctx: ClientContext) -> Update:
        update = super().fit(model, ctx)
        return Update(
            {**update.arrays, "extra": {"w": np.ones(3, np.float32)}}, update.metrics, ctx.num_train
        )


class _Undeclared(_Extra):
    """The same uploads, declared by nobody: the default declaration says the model alone."""

    name = "undeclared_upload"

    def uploads(self) -> Uploads:
        return Strategy.uploads(self)


class _Broadcast(_Extra):
    """The extra array is part of the state the server broadcasts: the wrapper can clip and noise it."""

    name = "broadcast_upload"

    def init(self, model: Weights, ctx: ServerContext) -> Arrays:
        return {MODEL: model, "extra": {"w": np.zeros(3, np.float32)}}


def test_a_new_strategy_uploading_what_dp_cannot_clip_is_refused_without_a_flag(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    _new_strategy(monkeypatch, _Extra)
    preflight(tiny_config("strategy.name=extra_upload"))  # no DP: nothing to protect
    with pytest.raises(ConfigError) as info:
        preflight(tiny_config(*DP, "strategy.name=extra_upload"))
    message = str(info.value)
    assert "strategy.name = 'extra_upload'" in message and "'extra'" in message and "broadcast" in message
    assert "\n" not in message


def test_an_upload_the_strategy_does_not_declare_is_refused_on_the_client(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmem.client import train_client
    from fedmem.simulation import server_context

    _new_strategy(monkeypatch, _Undeclared)
    cfg = tiny_config(*DP, "strategy.name=undeclared_upload")
    preflight(cfg)  # its declaration (the model alone) is one DP protects ...
    state = _Undeclared(cfg).init(server_context(cfg).initial_weights(), server_context(cfg))
    with pytest.raises(FederationError, match=r"uploaded 'extra', which its uploads\(\) do not declare"):
        train_client(cfg, 0, 1, state)  # ... so what it really uploads never reaches the server


def test_a_declared_broadcast_upload_is_clipped_and_noised(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmem.client import train_client
    from fedmem.simulation import server_context

    _new_strategy(monkeypatch, _Broadcast)
    cfg = tiny_config(*DP, "strategy.name=broadcast_upload")
    preflight(cfg)
    server = server_context(cfg)
    state = _Broadcast(cfg).init(server.initial_weights(), server)
    upload = train_client(cfg, 0, 1, state)
    moved = [subtract(upload.arrays[n], state[n]) for n in (MODEL, "extra")]
    assert global_norm(moved) == pytest.approx(0.5, rel=1e-5)  # clipped jointly with the model
    (one,) = privatize(cfg, [Reply(0, upload.num_examples, upload.arrays, upload.metrics)], state, 1, 1)
    assert not np.array_equal(one.arrays["extra"]["w"], upload.arrays["extra"]["w"])  # noised
