"""Sample-level DP-SGD (Abadi et al., CCS 2016) as ``strategy.gradient = "dpsgd"``, and its accounting.

The rule against a loop of single-example backward passes, the clipping bound, the noise's
reproducibility and standard deviation, the epsilon against dp-accounting's RDP accountant
called directly, refusals, and a tiny run that reports ``sample_epsilon``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from torch import nn
from torch.nn import functional as F

from fedmem.config import Config, load_config
from fedmem.errors import ConfigError
from fedmem.models import build_model
from fedmem.privacy import SAMPLE_ACCOUNTING, sample_epsilon
from fedmem.reports.tables import privacy_note
from fedmem.training import (
    Batch,
    clip_per_example,
    dpsgd_gradient,
    gradient_rule,
    mean_gradient,
    per_example_gradients,
    steps_per_fit,
)


def _cnn() -> nn.Module:
    return build_model("cnn", (1, 28, 28), 10, 16, 0)


def _batch(seed: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _never() -> Batch:
    raise AssertionError("this gradient draws no batch")


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _norms(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    b = next(iter(rows.values())).shape[0]
    return torch.sqrt(sum(g.reshape(b, -1).pow(2).sum(dim=1) for g in rows.values()))  # type: ignore[arg-type]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as a Ray actor has (vmap on two busy cores was several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the rule


def test_clipping_by_hand() -> None:
    """Joint norm over all tensors of an example: (3, 4) has norm 5; zero and short rows stay as they are."""
    rows = {"a": torch.tensor([[3.0], [0.0], [0.3]]), "b": torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.4, 0.0]])}
    clipped = clip_per_example(rows, 1.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([[0.6], [0.0], [0.3]]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8, 0.0], [0.0, 0.0], [0.4, 0.0]]))
    assert torch.equal(clipped["a"][2], rows["a"][2])  # within the bound: bit for bit


def test_every_clipped_per_example_gradient_is_within_the_bound() -> None:
    model = _cnn()
    _, grads = per_example_gradients(model, _batch(0, 16))
    norms = _norms(grads)
    clip = float(norms.median())  # about half of the examples are clipped
    clipped = _norms(clip_per_example(grads, clip))
    assert bool((norms > clip).any()) and bool((norms < clip).any())
    assert float(clipped.max()) <= clip * (1 + 1e-6)
    torch.testing.assert_close(clipped[norms <= clip], norms[norms <= clip])


def test_noise_free_rule_is_the_mean_of_clipped_single_example_gradients() -> None:
    """Oracle: one backward pass per example, clipped jointly by hand, averaged."""
    model, (x, y) = _cnn(), _batch(1, 6)
    params = list(model.named_parameters())
    weights = [p for _, p in params]
    rows: list[list[torch.Tensor]] = []
    for i in range(len(y)):
        rows.append(list(torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), weights)))
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in row)) for row in rows]
    clip = sorted(norms)[2]  # three examples clipped, three not
    expected = [
        torch.stack([row[j] / max(1.0, n / clip) for row, n in zip(rows, norms, strict=True)]).mean(dim=0)
        for j in range(len(params))
    ]
    loss = dpsgd_gradient(clip, 0.0, torch.Generator())(model, (x, y), _never)
    for (_, p), e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-6)
    assert float(loss) == pytest.approx(float(F.cross_entropy(model(x), y).detach()), abs=1e-6)


def test_huge_clip_and_no_noise_is_the_mean_gradient() -> None:
    model, batch = _cnn(), _batch(2)
    dpsgd_gradient(1e12, 0.0, torch.Generator())(model, batch, _never)
    private = _grads(model)
    model.zero_grad(set_to_none=True)
    mean_gradient()(model, batch, _never)
    plain = _grads(model)
    assert private.keys() == plain.keys() == dict(model.named_parameters()).keys()
    for k in plain:
        torch.testing.assert_close(private[k], plain[k], rtol=0, atol=1e-6)


def _noisy(seed: int, noise: float, clip: float, batch: Batch) -> dict[str, torch.Tensor]:
    model = _cnn()
    dpsgd_gradient(clip, noise, torch.Generator().manual_seed(seed))(model, batch, _never)
    return _grads(model)


def test_noise_is_reproducible_and_has_the_right_std() -> None:
    """Noise / B has std z C / B on every coordinate.

    The model has about 38.5k parameters; the sample std of N standard normals is within
    5 / sqrt(2N) (about 2 %) of the truth except with probability below 1e-6, and the sample
    mean within 5 / sqrt(N) std of 0.
    """
    batch, clip, noise = _batch(3), 0.1, 2.0
    first, again, other = (
        _noisy(7, noise, clip, batch),
        _noisy(7, noise, clip, batch),
        _noisy(8, noise, clip, batch),
    )
    clean = _noisy(7, 0.0, clip, batch)
    for k in first:
        assert torch.equal(first[k], again[k])  # same generator state, same numbers
    assert any(not torch.equal(first[k], other[k]) for k in first)
    residual = torch.cat([(first[k] - clean[k]).reshape(-1) for k in first]).double()
    n, std = residual.numel(), noise * clip / len(batch[1])
    assert n > 38_000
    assert float(residual.std()) == pytest.approx(std, rel=5 / math.sqrt(2 * n))
    assert abs(float(residual.mean())) < 5 * std / math.sqrt(n)


def test_dpsgd_needs_a_generator_and_per_example_gradients() -> None:
    with pytest.raises(ValueError, match="generator"):
        gradient_rule("dpsgd", dp_clip=1.0, dp_noise=1.0)
    rule = gradient_rule("dpsgd", dp_clip=1.0, dp_noise=1.0, generator=torch.Generator())
    assert rule is not None
    with pytest.raises(ValueError, match="BatchNorm"):
        rule(build_model("cnn_bn", (1, 28, 28), 10, 16, 0), _batch(0), _never)
    text = torch.randint(0, 30, (4, 20)), torch.randint(0, 30, (4, 20))
    with pytest.raises(ValueError, match="GRU"):
        rule(build_model("char_gru", (20,), 30, 16, 0), text, _never)


# --------------------------------------------------------------------------- accounting


def _direct(z: float, q: float, steps: int, delta: float) -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def test_sample_epsilon_is_the_accountants_value_and_behaves() -> None:
    assert sample_epsilon(1.1, 32 / 700, 220, 1e-5) == _direct(1.1, 32 / 700, 220, 1e-5)
    assert sample_epsilon(0.8, 0.1, 50, 1e-6) == _direct(0.8, 0.1, 50, 1e-6)
    grows = [sample_epsilon(1.0, 0.05, steps, 1e-5) for steps in (10, 100, 1000)]
    assert 0 < grows[0] < grows[1] < grows[2]
    falls = [sample_epsilon(z, 0.05, 100, 1e-5) for z in (0.7, 1.0, 2.0, 4.0)]
    assert falls == sorted(falls, reverse=True) and len(set(falls)) == 4
    assert sample_epsilon(1.0, 0.05, 0, 1e-5) == 0.0
    assert sample_epsilon(0.0, 0.05, 10, 1e-5) == math.inf


def test_steps_per_fit_by_hand() -> None:
    assert steps_per_fit(70, 32, 2, 0) == 6  # 2 epochs of ceil(70 / 32) = 3 batches
    assert steps_per_fit(70, 32, 2, 5) == 5  # local_steps wins
    assert steps_per_fit(0, 32, 2, 5) == 0


# --------------------------------------------------------------------------- config and end to end


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["strategy.dp_clip=0"], ["strategy.dp_clip", "> 0"]),
        (["strategy.dp_noise=-1"], ["strategy.dp_noise", ">= 0"]),
    ],
)
def test_bad_values_are_refused_with_a_sentence(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("default", overrides)
    for word in words:
        assert word in str(err.value)


def test_models_and_strategies_without_per_example_gradients_are_refused(
    tiny_config: Callable[..., Config],
) -> None:
    from fedmem.jobs import preflight
    from strategies import check_config

    with pytest.raises(ConfigError) as err:  # the model is built once, before a run
        preflight(tiny_config("model.name=cnn_bn", "strategy.gradient='dpsgd'"))
    assert all(w in str(err.value) for w in ("'dpsgd'", "BatchNorm", "strategy.gradient = 'mean'"))
    with pytest.raises(ConfigError, match="apfl"):
        check_config(tiny_config("strategy.name=apfl", "strategy.gradient='dpsgd'"))


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_run_reports_the_worst_clients_sample_epsilon(tiny_config: Callable[..., Config]) -> None:
    """Every client trains every round (fraction_fit 1): 2 rounds x 3 steps at q = 32 / n, worst n."""
    from fedmem.federated_data import federation, training_clients
    from fedmem.simulation import InProcessExecutor, run_federation

    options = ["eval.personalizers=[]", "strategy.local_steps=3", "strategy.gradient='dpsgd'"]
    cfg = tiny_config(*options, "strategy.dp_noise=1.5", "strategy.dp_clip=2.0")
    state, summary = run_federation(cfg, InProcessExecutor(cfg))
    smallest = min(len(federation(cfg).clients[p].train) for p in training_clients(cfg))
    assert summary["sample_epsilon"] == pytest.approx(_direct(1.5, 32 / smallest, 6, 1e-5), rel=1e-12)
    assert summary["sample_delta"] == 1e-5 and summary["sample_accounting"] == SAMPLE_ACCOUNTING
    assert "epsilon" not in summary  # no client-level noise
    assert "sample ε" in privacy_note(summary)
    assert all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in state["model"].values())
    quiet_cfg = tiny_config(*options, "strategy.dp_noise=0", "strategy.dp_clip=2.0")
    quiet, quiet_summary = run_federation(quiet_cfg, InProcessExecutor(quiet_cfg))
    assert "sample_epsilon" not in quiet_summary  # no noise, no guarantee claimed
    assert any((quiet["model"][k] != state["model"][k]).any() for k in state["model"])


def test_client_level_and_sample_level_epsilon_side_by_side() -> None:
    note = privacy_note(
        {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", "sample_epsilon": 4.1, "sample_delta": 1e-5}
    )
    assert note == "ε 3.00 at δ 1e-05 (rdp) · sample ε 4.10 at δ 1e-05 (Poisson approx.)"


def test_each_training_call_of_a_fit_draws_its_own_noise() -> None:
    """local_gradient keys the generator by (seed, "dpsgd"[/purpose], round, client): same key, same noise."""
    from fedmem.strategy import ClientContext, Strategy
    from tests.strategies.conftest import synthetic_client

    cfg = load_config(
        "default", ["strategy.gradient='dpsgd'", "strategy.dp_noise=1.0", "model.embedding_dim=8"]
    )
    strategy = Strategy(cfg)

    def noise(pid: int, server_round: int, purpose: str) -> torch.Tensor:
        ctx = ClientContext(cfg, pid, server_round, synthetic_client(cfg, 0, n=8))
        model = ctx.new_model()
        batch = (ctx.data.x_train, ctx.data.y_train)
        rule = strategy.local_gradient(ctx, purpose)
        assert rule is not None
        rule(model, batch, _never)
        noisy = torch.cat([g.reshape(-1) for g in _grads(model).values()])
        dpsgd_gradient(cfg.strategy.dp_clip, 0.0, torch.Generator())(model, batch, _never)
        return noisy - torch.cat([g.reshape(-1) for g in _grads(model).values()])

    fit = noise(0, 1, "fit")
    assert torch.equal(fit, noise(0, 1, "fit"))
    for other in (noise(0, 1, "head"), noise(1, 1, "fit"), noise(0, 2, "fit")):
        assert not torch.allclose(fit, other)


def test_fedrep_counts_its_head_phase_and_ifca_is_refused(tiny_config: Callable[..., Config]) -> None:
    from fedmem.client import get_strategy
    from strategies import check_config

    base = ["strategy.gradient='dpsgd'", "strategy.local_epochs=2"]
    assert get_strategy(tiny_config(*base)).dp_steps(70) == 6  # 2 epochs of ceil(70 / 32) batches
    fedrep = tiny_config(*base, "strategy.name=fedrep", "strategy.fedrep.head_epochs=3")
    assert get_strategy(fedrep).dp_steps(70) == 6 + 9  # plus 3 head epochs of 3 batches
    check_config(fedrep)
    with pytest.raises(ConfigError) as err:
        check_config(tiny_config(*base, "strategy.name=ifca"))
    assert all(w in str(err.value) for w in ("'dpsgd'", "ifca", "cluster"))
